"""Llama-3.x and Qwen3 decoder-only language models as pure functions of a parameter pytree.

One family, two architectures (Hugging Face names): ``LlamaForCausalLM`` (Llama 3.x, with the llama3 RoPE
frequency scaling of Llama 3.1/3.2) and ``Qwen3ForCausalLM`` (the same block with a per-head RMSNorm of q and k
before RoPE). Grouped-query attention (``num_kv_heads`` ≤ ``num_heads``), ``head_dim`` free of
``hidden_size / num_heads``, tied or untied output embedding.

Parameters (shapes for L layers, D = hidden_size, H / K query / key-value heads of size d, I = intermediate;
matrices in the Hugging Face (out, in) layout, so y = x Wᵀ; the L layers stacked on a leading axis)::

    embed (V, D)   norm (D,)   lm_head (V, D) (untied only)
    layers: attn_norm (L, D)  q (L, H·d, D)  k, v (L, K·d, D)  o (L, D, H·d)  q_norm, k_norm (L, d) (Qwen3 only)
            mlp_norm (L, D)   gate, up (L, I, D)  down (L, D, I)

Numerics follow the reference implementation: RMSNorm in float32 then cast back, the RoPE tables in float32
then cast to the activations' dtype, attention scores in the activations' dtype with the (additive) padding
mask and the softmax in float32.
The output projection accumulates in float32 (float64 for float64 parameters), so :func:`forward` returns
float32 logits for bfloat16 or float32 parameters.

Layers run under ``lax.scan``; each block is wrapped in ``jax.checkpoint`` with the policy ``cfg.remat``:
``"full"`` (save only each block's input, recompute the block in the backward pass), ``"dots"`` (also save the
outputs of the weight matmuls, ``dots_with_no_batch_dims_saveable``) or ``"none"`` (no rematerialisation).
Every function is a pure function of ``params``, so jax.grad / jvp / linearize (and so ``curvature.hvp``,
``fisher_vp``, ``flow_taylor``, ``aic.measure``) compose with it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["ARCHITECTURES", "REMAT_POLICIES", "Llama3RoPE", "LlamaConfig", "init_params", "forward",
           "hidden_states", "lm_head", "param_count", "param_shapes", "rope_inv_freq", "rope_tables",
           "positions_from_mask", "causal_allowed", "decoder", "rms_norm", "softmax", "silu", "linear",
           "PROJECTIONS"]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
REMAT_POLICIES = ("full", "dots", "none")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Llama3RoPE:
    """The llama3 RoPE frequency scaling (Llama 3.1 / 3.2): wavelengths above original/low_freq_factor are
    divided by ``factor``, those below original/high_freq_factor kept, and the band between interpolated."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (hashable: a static argument of jitted functions).

    ``remat`` is the rematerialisation policy of each block (one of REMAT_POLICIES); change it with
    ``dataclasses.replace(cfg, remat="dots")``. ``eos_token_id`` is a tuple (generation stops at any of them).
    ``activation_sharding``: None, or a ``jax.sharding.NamedSharding`` for the (B, T, D) hidden states that
    every block input is constrained to — ``NamedSharding(mesh, P(axis))`` splits the batch over the axis the
    parameters are sharded over (FSDP), so XLA gathers each layer's weights inside the layer loop instead of
    gathering the activations (the batch must then divide by the axis size).
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RoPE] = None
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    remat: str = "full"
    activation_sharding: Any = None

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LlamaConfig.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"LlamaConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"LlamaConfig.rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, "
                             f"{self.rope_theta}")
        if not isinstance(self.eos_token_id, tuple):
            raise ValueError(f"LlamaConfig.eos_token_id must be a tuple of ints, got {self.eos_token_id!r}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm of q and k before RoPE."""
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


# --------------------------------------------------------------------------- parameters


def param_shapes(cfg: LlamaConfig) -> dict:
    """{name: shape} of every parameter (nested like the params pytree)."""
    L, D, d, Imid = cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    Hd, Kd = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = {"attn_norm": (L, D), "q": (L, Hd, D), "k": (L, Kd, D), "v": (L, Kd, D), "o": (L, D, Hd),
              "mlp_norm": (L, D), "gate": (L, Imid, D), "up": (L, Imid, D), "down": (L, D, Imid)}
    if cfg.qk_norm:
        layers.update(q_norm=(L, d), k_norm=(L, d))
    out = {"embed": (cfg.vocab_size, D), "layers": layers, "norm": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (cfg.vocab_size, D)
    return out


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


def init_params(cfg: LlamaConfig, key, dtype="float32", std: float = 0.02) -> PyTree:
    """θ₀: matrices ~ N(0, std²) (the reference's initializer_range), RMSNorm weights = 1."""
    shapes = param_shapes(cfg)
    flat = [("embed", shapes["embed"]), ("norm", shapes["norm"])] + [
        ("layers/" + k, s) for k, s in shapes["layers"].items()]
    if "lm_head" in shapes:
        flat.append(("lm_head", shapes["lm_head"]))
    keys = jax.random.split(key, len(flat))
    out: dict = {"layers": {}}
    for kk, (name, shape) in zip(keys, flat):
        leaf = name.split("/")[-1]
        x = jnp.ones(shape, dtype) if _is_norm(leaf) else std * jax.random.normal(kk, shape, jnp.float32)
        tgt = out["layers"] if name.startswith("layers/") else out
        tgt[leaf] = x.astype(dtype)
    return out


def param_count(params: PyTree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------- numerics


def rms_norm(x, w, eps: float):
    """w ⊙ x / √(mean x² + eps): the normalisation in float32, cast back to x's dtype, then scaled."""
    dt = x.dtype
    xf = x.astype(jnp.promote_types(dt, jnp.float32))
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * y.astype(dt)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ω_j = θ^(−2j/d), j < d/2 (float32), with the llama3 scaling when configured."""
    d = cfg.head_dim
    expo = (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)).astype(np.float32)
    inv = (np.float32(1.0) / (np.float64(cfg.rope_theta) ** expo.astype(np.float64)).astype(np.float32))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    f32 = np.float32
    old = f32(rs.original_max_position_embeddings)
    low_wl, high_wl = old / f32(rs.low_freq_factor), old / f32(rs.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wl, inv / f32(rs.factor), inv).astype(np.float32)
    smooth = ((old / wavelen - f32(rs.low_freq_factor)) / f32(rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (f32(1) - smooth) * scaled / f32(rs.factor) + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@jax.custom_jvp
def softmax(s):
    """softmax over the last axis, p = exp(s − max s) / Σ exp(s − max s).

    Its derivative is written in terms of p alone (ṗ = p ⊙ (ṡ − ⟨p, ṡ⟩)), so reverse mode saves one tensor
    (p) per attention instead of the scores, their exponentials and p; it composes to any order."""
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (s,), (t,) = primals, tangents
    p = softmax(s)
    return p, p * (t - jnp.sum(p * t, axis=-1, keepdims=True))


@jax.custom_jvp
def silu(x):
    """x σ(x); the derivative σ(x)(1 + x(1 − σ(x))) is the only tensor reverse mode saves."""
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    sg = jax.nn.sigmoid(x)
    return x * sg, t * (sg * (1 + x * (1 - sg)))


def positions_from_mask(attention_mask, T: int):
    """Position ids (B, T): cumsum(mask) − 1 (padding tokens get 0), so left padding does not shift positions."""
    if attention_mask is None:
        return jnp.arange(T, dtype=jnp.int32)[None, :]
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def rope_tables(cfg: LlamaConfig, positions, dtype):
    """cos, sin (B, T, d) of the rotary embedding at ``positions``, computed in float32, cast to ``dtype``."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x, cos, sin):
    """x (B, T, heads, d) rotated: x cos + rotate_half(x) sin, rotate_half(x) = (−x₂, x₁)."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def linear(x, w, preferred_element_type=None):
    """y = x Wᵀ over the last axis: x (..., d), W (o, d) in Hugging Face's (out, in) layout → y (..., o).

    The leading axes are flattened to one before the matmul, so every dot of the forward and backward passes is
    a plain 2-D GEMM. Written as a 3-D einsum, reverse mode's weight gradient dW = Σ_{b,t} δ_bt x_btᵀ makes
    XLA:CPU transpose the cotangent (B, T, o) → (o, B·T) fused with its elementwise producers, a strided loop
    that cost over half of a small Llama's gradient (590k parameters: 70 → 39 ms per step)."""
    lead = x.shape[:-1]
    dt = jnp.result_type(x, w)
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]).astype(dt), w.astype(dt), (((1,), (1,)), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(lead + (w.shape[0],))


def _proj(x, lp, lora, name, scale):
    """x Wᵀ for the layer's weight ``name``, plus the LoRA update s·(x Aᵀ) Bᵀ when ``lora`` adapts it."""
    y = linear(x, lp[name])
    if lora is not None and name in lora:
        ab = lora[name]
        y = y + (scale * linear(linear(x, ab["A"]), ab["B"])).astype(y.dtype)
    return y


def _block(cfg: LlamaConfig, h, lp, lora, lora_scale, cos, sin, allowed, kv=None, index=None):
    """One decoder block on h (B, T, D). ``allowed`` (B, T, S) marks the keys each query may attend to.

    Without ``kv`` the keys are this call's own (S = T). With ``kv = (k_cache, v_cache)`` of shape
    (B, S, K, d), the new keys/values are written at slot ``index`` and attention runs over the whole cache;
    the updated cache is returned."""
    B, T, _ = h.shape
    d, H, K, G = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.groups
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = _proj(x, lp, lora, "q", lora_scale).reshape(B, T, H, d)
    k = _proj(x, lp, lora, "k", lora_scale).reshape(B, T, K, d)
    v = _proj(x, lp, lora, "v", lora_scale).reshape(B, T, K, d)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    if kv is not None:
        zero, at = jnp.zeros((), jnp.int32), jnp.asarray(index, jnp.int32)
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (zero, at, zero, zero))
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (zero, at, zero, zero))
    qg = q.reshape(B, T, K, G, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (d ** -0.5)
    sf = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    bias = jnp.where(allowed, jnp.zeros((), sf.dtype), jnp.finfo(sf.dtype).min)  # additive mask, as the reference
    p = softmax(sf + bias[:, None, None]).astype(q.dtype)
    att = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H * d)
    h = h + _proj(att, lp, lora, "o", lora_scale)
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = silu(_proj(x, lp, lora, "gate", lora_scale)) * _proj(x, lp, lora, "up", lora_scale)
    h = h + _proj(mlp, lp, lora, "down", lora_scale)
    return h, (None if kv is None else (k, v))


_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
             "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def decoder(cfg: LlamaConfig, params: PyTree, h, cos, sin, allowed, *, lora=None, lora_scale: float = 1.0,
            cache=None, index=None):
    """The L blocks over h (B, T, D) by ``lax.scan`` (each block under ``jax.checkpoint(policy=cfg.remat)``),
    then the final RMSNorm. ``cache`` = (k, v) of shape (L, B, S, K, d) is updated at slot ``index``.
    Returns (h (B, T, D), the updated cache or None)."""

    def body(h, xs):
        lp, la, kv = xs
        if cfg.activation_sharding is not None:
            h = jax.lax.with_sharding_constraint(h, cfg.activation_sharding)
        return _block(cfg, h, lp, la, lora_scale, cos, sin, allowed, kv, index)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_POLICIES[cfg.remat], prevent_cse=False)
    h, new_cache = jax.lax.scan(body, h, (params["layers"], lora, cache))
    return rms_norm(h, params["norm"], cfg.rms_norm_eps), new_cache


def causal_allowed(attention_mask, B: int, T: int):
    """(B, T, T) boolean: query t may attend key s iff s ≤ t and key s is not padding."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (B, T, T))
    return causal & (attention_mask.astype(bool)[:, None, :])


def hidden_states(cfg: LlamaConfig, params: PyTree, tokens, *, attention_mask=None, lora=None,
                  lora_scale: float = 1.0):
    """The final-norm hidden states (B, T, D) in the parameters' dtype (the input of the output projection)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
    B, T = tokens.shape
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask must have the shape of tokens {tokens.shape}, got "
                             f"{attention_mask.shape}")
    h = jnp.take(params["embed"], tokens, axis=0)
    cos, sin = rope_tables(cfg, positions_from_mask(attention_mask, T), h.dtype)
    h, _ = decoder(cfg, params, h, cos, sin, causal_allowed(attention_mask, B, T), lora=lora, lora_scale=lora_scale)
    return h


def lm_head(cfg: LlamaConfig, params: PyTree, h):
    """Logits z = h Wᵀ (W = lm_head, or the embedding when tied), accumulated in float32 (float64 for float64)."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    out = jnp.promote_types(w.dtype, jnp.float32)
    return linear(h, w, preferred_element_type=out).astype(out)


def forward(cfg: LlamaConfig, params: PyTree, tokens, *, attention_mask=None, lora=None,
            lora_scale: float = 1.0):
    """Logits z = f_θ(tokens) (B, T, V), float32 (float64 for float64 parameters); position t predicts token t+1.

    tokens (B, T) int; attention_mask (B, T) of 1 (token) / 0 (padding), left or right padding: padding keys
    are masked out and positions count real tokens only (cumsum(mask) − 1). ``lora`` (adapters stacked over
    layers, see :mod:`alignment_geom.models.lora`) adds s·B A to the adapted projections at apply time.
    """
    return lm_head(cfg, params, hidden_states(cfg, params, tokens, attention_mask=attention_mask, lora=lora,
                                              lora_scale=lora_scale))
