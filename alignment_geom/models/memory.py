"""Peak-memory estimates for the Llama/Qwen3 family: what fits where, before anything is compiled or allocated.

:func:`estimate_memory` returns the peak bytes per device of one operation at the scale of the configuration —
"grad" (∇L), "adam" (one full fine-tuning step with Adam), "hvp" (H v, forward-over-reverse), "third_order"
(D³L[u, v, ·]), "fisher_vp" (F v, linearise + transpose), "per_example_grads" (∇ log πᵢ, ``chunk`` examples at
a time) and "lanczos" (a basis of ``basis_vectors`` vectors plus the matvec it runs) — for full fine-tuning or
LoRA, at a batch, sequence length, parameter dtype, rematerialisation policy (``cfg.remat``) and FSDP degree.

The activation terms are not hand-written formulas: the residuals (tensors saved for the backward pass) of one
decoder block and of the output head are *traced* from this package's own model code, with abstract shapes
(``jax.make_jaxpr`` of ``jax.vjp``; nothing is computed or allocated), so they follow the code and the dtype.
With A the activation bytes of one gradient (per device),

    A = L·(h + S_policy) + max(R_head, R_block − S_policy + c·R_block) + W_head,

where h = B·T·D (the block input the layer scan keeps), S_policy the residuals the remat policy keeps per layer
(0 for "full", the matmul outputs for "dots", all of R_block for "none"), R_block all residuals of one block
(re-created while it is recomputed in the backward pass), c·R_block the cotangents alive meanwhile
(:data:`COTANGENT_FRACTION`, with remat only), R_head the residuals of the output projection and the
log-softmax at the K completion positions (one ``logit_chunk`` of them when the loss is chunked), and W_head
the output projection's gradient in flight (V·D; none for LoRA, whose head is frozen). With P the stored
parameters, G the gradients of the trained ones (the adapters for LoRA) and N = P the full-size vectors the
curvature operators take and return (zero outside a mask, so full-size for LoRA too):

    grad          P + G + A
    adam          P + G + 3·n_trained·b_opt + A        (two moments and the update, in ``opt_dtype``)
    hvp           P + 2N + G + 2A                      (v, H v, the primal gradient; every residual gets a tangent)
    third_order   P + 2N + 2G + 4A
    fisher_vp     P + 2N + A' + 2·B·K·V·4              (A without R_head; z and J v in float32)
    per_example   P + c·N + G + c·A(batch 1)           (c = ``chunk`` examples at a time)
    lanczos       16·⌈k/16⌉·n·b_basis + the matvec's   (the basis is stored in blocks of 16 rows)

These are the buffers XLA keeps on CPU for this model: tests/test_llama.py checks each against
``jax.jit(f).lower(...).compile().memory_analysis()`` on small float32 configurations, within 25 % (bfloat16 is
not checked on CPU, whose compiler turns bfloat16 matmuls into float32 ones with converted copies). With
``devices`` > 1 (FSDP: parameters, gradients, optimiser state, vectors and basis split over the devices, and the
batch too, with ``cfg.activation_sharding`` set) each device also holds one layer's gathered weights twice and
the gathered embedding.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.models.llama import LlamaConfig, _block, lm_head, param_shapes
from alignment_geom.models.lora import LoRAConfig

__all__ = ["PUBLISHED_CONFIGS", "OPS", "COTANGENT_FRACTION", "MemoryEstimate", "estimate_memory", "activation_bytes",
           "residual_bytes"]

# config.json of the two models of the paper's Section 7, as published on the Hugging Face Hub
PUBLISHED_CONFIGS = {
    "Qwen/Qwen3-1.7B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "meta-llama/Llama-3.2-3B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
}

# the cotangents alive while one recomputed block is differentiated, as a fraction of its residuals R_block
# (XLA CPU buffer assignment on small configurations, with every projection a 2-D GEMM (llama.linear): about
# 0.25 for full parameters and for LoRA adapters alike; not counted without remat, where they reuse the
# buffers of the residuals already consumed)
COTANGENT_FRACTION = {"full": 0.25, "lora": 0.25}
OPS = ("grad", "adam", "hvp", "third_order", "fisher_vp", "per_example_grads", "lanczos")
_POLICY = {"full": jax.checkpoint_policies.nothing_saveable,
           "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class MemoryEstimate(NamedTuple):
    """Peak bytes per device of one operation (``peak``) and the terms it adds up (``breakdown``, bytes)."""
    op: str
    peak: int
    n_params: int
    n_trainable: int
    devices: int
    breakdown: Dict[str, int]

    @property
    def gib(self) -> float:
        return self.peak / 2 ** 30


def residual_bytes(f, *args) -> int:
    """Bytes of the residuals ``jax.vjp(f, *args)`` saves for the backward pass, other than f's own inputs.

    ``args`` may be ``jax.ShapeDtypeStruct`` s: only the jaxpr is traced, nothing is computed."""
    closed = jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1])(*args)
    inputs = set(closed.jaxpr.invars)
    seen, total = set(), 0
    for v in closed.jaxpr.outvars:
        if not hasattr(v, "aval") or type(v).__name__ == "Literal" or v in inputs or v in seen:
            continue
        seen.add(v)
        total += int(np.prod(v.aval.shape)) * jnp.dtype(v.aval.dtype).itemsize
    return total


def _lora_shapes(cfg: LlamaConfig, lora: LoRAConfig, dt):
    sh = param_shapes(cfg)["layers"]
    return {t: {"A": jax.ShapeDtypeStruct((lora.rank, sh[t][2]), dt),
                "B": jax.ShapeDtypeStruct((sh[t][1], lora.rank), dt)} for t in lora.targets}


def activation_bytes(cfg: LlamaConfig, batch: int, seq_len: int, dtype="bfloat16", *,
                     completion_len: Optional[int] = None, lora: Optional[LoRAConfig] = None,
                     logit_chunk: Optional[int] = None) -> Dict[str, int]:
    """The traced activation terms (bytes) of one gradient at (batch, seq_len): ``h``, ``saved`` (S_policy per
    layer), ``block`` (R_block), ``head`` (R_head), ``head_grad`` (W_head) and their combination ``A``."""
    S = jax.ShapeDtypeStruct
    dt = jnp.dtype(dtype)
    B, T, D = int(batch), int(seq_len), cfg.hidden_size
    K = T if completion_len is None else int(completion_len)
    lp = {k: S(s[1:], dt) for k, s in param_shapes(cfg)["layers"].items()}
    la = None if lora is None else _lora_shapes(cfg, lora, dt)
    scale = 1.0 if lora is None else lora.scale
    h, cos = S((B, T, D), dt), S((B, T, cfg.head_dim), dt)
    allowed = S((B, T, T), jnp.bool_)

    def blk(h, lp, la, cos, sin, allowed):
        if lora is not None:  # LoRA: θ₀ frozen (objectives.lm_problem), only the adapters are differentiated
            lp = jax.lax.stop_gradient(lp)
        return _block(cfg, h, lp, la, scale, cos, sin, allowed)[0]

    def ins(f):
        return residual_bytes(f, h, lp, la, cos, cos, allowed)

    block = ins(blk)
    saved = block if cfg.remat == "none" else ins(jax.checkpoint(blk, policy=_POLICY[cfg.remat]))
    W = S((cfg.vocab_size, D), dt)
    c = K if logit_chunk is None else min(int(logit_chunk), K)

    def head(hk, W, tg):
        z = lm_head(cfg, {"embed": W, "lm_head": W}, hk)
        return jnp.take_along_axis(z, tg[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)

    r_head = residual_bytes(head, S((B, c, D), dt), W, S((B, c), jnp.int32))
    if logit_chunk is not None:
        r_head += B * K * D * dt.itemsize  # the hidden states at every position are the chunked loss's residual
    head_grad = 0 if lora is not None else cfg.vocab_size * D * dt.itemsize  # LoRA: the head is frozen
    hb = B * T * D * dt.itemsize
    frac = COTANGENT_FRACTION["full" if lora is None else "lora"]
    recompute = block - saved + (0 if cfg.remat == "none" else int(frac * block))
    layers = cfg.num_layers * (hb + saved)
    A = layers + max(r_head, recompute) + head_grad
    return {"h": hb, "saved": saved, "block": block, "recompute": recompute, "head": r_head, "head_grad": head_grad,
            "A": A, "A_logits": layers + recompute + head_grad}


def _count(cfg: LlamaConfig, lora: Optional[LoRAConfig]):
    shapes = param_shapes(cfg)
    n = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    if lora is None:
        return n, n
    sh = shapes["layers"]
    return n, sum(cfg.num_layers * lora.rank * (sh[t][1] + sh[t][2]) for t in lora.targets)


def estimate_memory(cfg: LlamaConfig, op: str, *, batch: int, seq_len: int, dtype="bfloat16",
                    completion_len: Optional[int] = None, lora: Optional[LoRAConfig] = None, devices: int = 1,
                    chunk: int = 1, logit_chunk: Optional[int] = None, opt_dtype="float32",
                    basis_vectors: int = 20, basis_dtype="float32", basis_op: str = "fisher_vp") -> MemoryEstimate:
    """Peak bytes per device of ``op`` (one of OPS) on a (batch, seq_len) token batch (module docstring).

    ``completion_len``: the K positions whose logits the loss and the Fisher use (default seq_len);
    ``lora``: train/measure only the adapters (the base is stored in ``dtype``); ``devices``: FSDP degree;
    ``chunk``: examples per chunk of per-example gradients; ``logit_chunk``: positions per block of logits in
    the loss (objectives.sft_loss(chunk=...)); ``basis_vectors``/``basis_dtype``/``basis_op``: the Lanczos basis
    and the operator it runs (``"fisher_vp"`` or ``"hvp"``)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for name, v in (("batch", batch), ("seq_len", seq_len), ("devices", devices), ("chunk", chunk)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if basis_op not in ("fisher_vp", "hvp"):
        raise ValueError(f"basis_op must be 'fisher_vp' or 'hvp', got {basis_op!r}")
    p = jnp.dtype(dtype).itemsize
    n, nt = _count(cfg, lora)
    local = math.ceil(batch / devices)
    K = seq_len if completion_len is None else int(completion_len)
    act = activation_bytes(cfg, local, seq_len, dtype, completion_len=K, lora=lora, logit_chunk=logit_chunk)
    A = act["A"]
    P = n * p // devices
    G = nt * p // devices  # gradients of the trained parameters
    Vn = P  # vectors of the curvature operators: full-size pytrees (zero outside a mask)
    bd: Dict[str, int] = {"params": P}
    if devices > 1:
        sh = param_shapes(cfg)["layers"]
        layer = sum(int(np.prod(s[1:])) for s in sh.values()) * p
        bd["gathered weights"] = 2 * layer + cfg.vocab_size * cfg.hidden_size * p
    if op == "grad":
        bd.update(grads=G, activations=A)
    elif op == "adam":
        bd.update(grads=G, optimizer=3 * nt * jnp.dtype(opt_dtype).itemsize // devices, activations=A)
    elif op == "hvp":
        bd.update(vectors=2 * Vn + G, activations=2 * A)
    elif op == "third_order":
        bd.update(vectors=2 * Vn + 2 * G, activations=4 * A)
    elif op == "fisher_vp":
        bd.update(vectors=2 * Vn, activations=act["A_logits"], logits=2 * local * K * cfg.vocab_size * 4)
    elif op == "per_example_grads":
        a1 = activation_bytes(cfg, 1, seq_len, dtype, completion_len=K, lora=lora, logit_chunk=logit_chunk)["A"]
        bd.update(gradients=chunk * Vn + G, activations=chunk * a1)
    else:  # lanczos
        inner = estimate_memory(cfg, basis_op, batch=batch, seq_len=seq_len, dtype=dtype, completion_len=K,
                                lora=lora, devices=devices, logit_chunk=logit_chunk)
        rows = 16 * math.ceil(basis_vectors / 16)
        bd.update({k: v for k, v in inner.breakdown.items() if k != "params"})
        bd["basis"] = rows * n * jnp.dtype(basis_dtype).itemsize // devices
    return MemoryEstimate(op, int(sum(bd.values())), n, nt, devices, {k: int(v) for k, v in bd.items()})
