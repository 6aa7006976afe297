"""A small causal transformer language model (Flax linen): the Section-7 model trained here.

Everything is a pure function over parameter pytrees:

* :class:`LMConfig` + :func:`init_params` / :func:`apply` — a pre-LayerNorm decoder-only transformer
  (token + learned position embeddings, ``layers`` blocks of causal multi-head self-attention and a
  GELU MLP, final LayerNorm, untied output head). ``apply(cfg, params, tokens) -> logits (B, T, V)``.
  Dense projections are named ``q, k, v, o`` (attention) and ``mlp_in, mlp_out`` (MLP).
* :func:`lm_loss` (masked next-token cross-entropy on answer tokens), :func:`logprob_fn` (per-example
  log π(answer | prompt)), :func:`completion_logits` (logits at chosen positions, for the Fisher of the
  safety skill on completion tokens only).
* :func:`generate` — greedy (temperature 0) or sampled decoding with an explicit PRNG key, a
  ``lax.fori_loop`` over new tokens (fixed shapes, no KV cache: contexts are ≤ 32 tokens).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Transformer hyper-parameters. ``dtype`` is the parameter/compute dtype name."""
    vocab_size: int = 64
    context: int = 32
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dtype: str = "float32"

    def __post_init__(self):
        for f in ("vocab_size", "context", "width", "layers", "heads", "mlp_ratio"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"LMConfig.{f} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"LMConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"LMConfig.dtype must be float32, float64 or bfloat16, got {self.dtype!r}")

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


class _Block(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, h):
        cfg, dt = self.cfg, self.cfg.jdtype
        B, T, D = h.shape
        H, dh = cfg.heads, cfg.width // cfg.heads
        dense = functools.partial(nn.Dense, dtype=dt, param_dtype=dt,
                                  kernel_init=nn.initializers.normal(1.0 / np.sqrt(D)))
        x = nn.LayerNorm(dtype=dt, param_dtype=dt, name="ln1")(h)
        q = dense(D, name="q")(x).reshape(B, T, H, dh)
        k = dense(D, name="k")(x).reshape(B, T, H, dh)
        v = dense(D, name="v")(x).reshape(B, T, H, dh)
        # a Python float (weakly typed): np.sqrt(dh) is a float64 scalar that promoted float32
        # attention to float64 whenever jax_enable_x64 was on (2x slower, and not the model's dtype)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) * float(dh) ** -0.5
        causal = jnp.tril(jnp.ones((T, T), bool))
        att = jnp.where(causal, att, jnp.asarray(-1e9, att.dtype))
        att = jax.nn.softmax(att, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, D)
        h = h + dense(D, name="o", kernel_init=nn.initializers.normal(1.0 / np.sqrt(D * 2 * cfg.layers)))(y)
        x = nn.LayerNorm(dtype=dt, param_dtype=dt, name="ln2")(h)
        x = nn.gelu(dense(D * cfg.mlp_ratio, name="mlp_in")(x))
        out_init = nn.initializers.normal(1.0 / np.sqrt(D * cfg.mlp_ratio * 2 * cfg.layers))
        return h + dense(D, name="mlp_out", kernel_init=out_init)(x)


class Transformer(nn.Module):
    """Decoder-only causal transformer; ``__call__(tokens (B, T) int) -> logits (B, T, V)``."""
    cfg: LMConfig

    @nn.compact
    def __call__(self, tokens, hidden_delta=None):
        cfg, dt = self.cfg, self.cfg.jdtype
        T = tokens.shape[-1]
        emb = nn.Embed(cfg.vocab_size, cfg.width, dtype=dt, param_dtype=dt, name="tok_emb",
                       embedding_init=nn.initializers.normal(1.0))
        pos = self.param("pos_emb", nn.initializers.normal(0.1), (cfg.context, cfg.width), dt)
        h = emb(tokens) + pos[:T]
        for i in range(cfg.layers):
            h = _Block(cfg, name=f"block_{i}")(h)
        h = nn.LayerNorm(dtype=dt, param_dtype=dt, name="ln_f")(h)
        if hidden_delta is not None:  # a perturbation of the final representation (rep-space gradients)
            h = h + hidden_delta
        return nn.Dense(cfg.vocab_size, dtype=dt, param_dtype=dt, name="head",
                        kernel_init=nn.initializers.normal(1.0 / np.sqrt(cfg.width)))(h)


def init_params(cfg: LMConfig, key) -> PyTree:
    """θ₀ ~ the initialisation above; a plain nested dict of arrays in ``cfg.dtype``."""
    tokens = jnp.zeros((1, cfg.context), jnp.int32)
    return jax.tree_util.tree_map(jnp.asarray, Transformer(cfg).init(key, tokens)["params"])


def apply(cfg: LMConfig, params: PyTree, tokens, hidden_delta=None) -> jax.Array:
    """Logits z = f_θ(tokens), shape (B, T, V); position t predicts token t + 1.

    ``hidden_delta`` (B, T, width), optional: added to the final (post-LayerNorm) representation h
    before the output head, so ∂/∂δ at δ = 0 gives representation-space gradients."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
    if tokens.shape[1] > cfg.context:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the context {cfg.context}")
    return Transformer(cfg).apply({"params": params}, tokens, hidden_delta)


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------- losses / policies


def lm_loss(cfg: LMConfig, params: PyTree, batch: Dict[str, Any]) -> jax.Array:
    """L(θ) = − Σ_{b,t} m_{b,t+1} log π_θ(x_{b,t+1} | x_{b,≤t}) / Σ m  (answer tokens only).

    batch: ``tokens`` (B, T) int, ``loss_mask`` (B, T) (1 where the token is a training target)."""
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    logits = apply(cfg, params, tokens[:, :-1])
    lp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    tok_lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(tok_lp.dtype)
    return -jnp.sum(tok_lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def logprob_fn(cfg: LMConfig, params: PyTree, batch: Dict[str, Any]) -> jax.Array:
    """Per-example log π_θ(answer | prompt) = Σ_t m_{t+1} log π(x_{t+1} | x_{≤t}); shape (B,)."""
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    logits = apply(cfg, params, tokens[:, :-1])
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(tok_lp * mask[:, 1:].astype(tok_lp.dtype), axis=-1)


def completion_positions(data: Dict[str, np.ndarray], length: int) -> np.ndarray:
    """(B, length) positions t whose logits predict the first ``length`` answer tokens
    (t = prompt_len − 1, …, prompt_len + length − 2)."""
    plen = np.asarray(data["prompt_len"])
    if np.any(np.asarray(data["answer_len"]) < length):
        raise ValueError(f"every answer must have at least {length} tokens")
    return (plen[:, None] - 1 + np.arange(length)[None, :]).astype(np.int32)


def completion_logits(cfg: LMConfig, params: PyTree, inputs: Dict[str, Any]) -> jax.Array:
    """logits_fn for the safety skill: the next-token logits at the completion positions only.

    inputs: ``tokens`` (B, T) and ``pos`` (B, K); returns (B, K, V), so a Fisher / KL that averages
    over the leading axes averages over completion tokens, not prompt tokens."""
    logits = apply(cfg, params, inputs["tokens"])
    return jnp.take_along_axis(logits, jnp.asarray(inputs["pos"])[:, :, None], axis=1)


# --------------------------------------------------------------------------- generation


def generate(cfg: LMConfig, params: PyTree, tokens, prompt_len, max_new: int, *, key=None,
             temperature: float = 0.0, eos_id: int = 3, pad_id: int = 0) -> jax.Array:
    """Continue each prompt for up to ``max_new`` tokens; returns (B, T) tokens.

    tokens (B, T): the prompts (anything from ``prompt_len`` on is overwritten), prompt_len (B,).
    ``temperature == 0`` is greedy (argmax; ``key`` unused); otherwise tokens are sampled from
    softmax(z / temperature) with the explicit PRNG ``key`` (deterministic for a key). After a row
    emits ``eos_id`` the rest of the row is ``pad_id``. A ``lax.fori_loop`` over new tokens."""
    tokens = jnp.asarray(tokens, jnp.int32)
    prompt_len = jnp.asarray(prompt_len, jnp.int32)
    B, T = tokens.shape
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampled generation (temperature > 0) needs an explicit PRNG key")
    key = jax.random.PRNGKey(0) if key is None else key
    return _generate(cfg, params, tokens, prompt_len, int(max_new), key, float(temperature), eos_id, pad_id)


@functools.partial(jax.jit, static_argnums=(0, 4, 6, 7, 8))
def _generate(cfg, params, tokens, prompt_len, max_new, key, temperature, eos_id, pad_id):
    B, T = tokens.shape
    cols = jnp.arange(T)[None, :]
    tokens = jnp.where(cols < prompt_len[:, None], tokens, pad_id)
    rows = jnp.arange(B)

    def body(i, carry):
        toks, done, key = carry
        cur = prompt_len + i  # position to write
        logits = apply(cfg, params, toks)
        z = logits[rows, jnp.clip(cur - 1, 0, T - 1)].astype(jnp.float32)
        key, sub = jax.random.split(key)
        if temperature == 0.0:
            nxt = jnp.argmax(z, axis=-1).astype(jnp.int32)
        else:
            nxt = jax.random.categorical(sub, z / temperature, axis=-1).astype(jnp.int32)
        write = (~done) & (cur < T)
        toks = toks.at[rows, jnp.clip(cur, 0, T - 1)].set(
            jnp.where(write, nxt, toks[rows, jnp.clip(cur, 0, T - 1)]))
        done = done | (write & (nxt == eos_id)) | (cur >= T - 1)
        return toks, done, key

    toks, _, _ = jax.lax.fori_loop(0, max_new, body, (tokens, jnp.zeros((B,), bool), key))
    return toks
