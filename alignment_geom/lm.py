"""A small causal transformer language model (Flax linen), LoRA adapters, generation and training.

Everything is a pure function over parameter pytrees:

* :class:`LMConfig` + :func:`init_params` / :func:`apply` — a pre-LayerNorm decoder-only transformer
  (token + learned position embeddings, ``layers`` blocks of causal multi-head self-attention and a
  GELU MLP, final LayerNorm, untied output head). ``apply(cfg, params, tokens) -> logits (B, T, V)``.
  Dense projections are named ``q, k, v, o`` (attention) and ``mlp_in, mlp_out`` (MLP).
* LoRA (Hu et al.) as *separate adapter parameters merged at apply time*: for a target Dense layer
  with kernel W₀ ∈ ℝ^{in×out}, W = W₀ + (α/r)·A B with A ∈ ℝ^{in×r} (Gaussian init, scale 1/√in) and
  B ∈ ℝ^{r×out} (zero init), so W = W₀ at initialisation. The trainable tree is
  ``{"base": θ₀, "lora": {block: {module: {"A", "B"}}}}``; :func:`lora_mask` selects the adapters and
  :func:`merge_lora` gives the merged base-shaped θ = θ₀ + Δθ used for every curvature quantity.
* :func:`lm_loss` (masked next-token cross-entropy on answer tokens), :func:`logprob_fn` (per-example
  log π(answer | prompt)), :func:`completion_logits` (logits at chosen positions, for the Fisher of the
  safety skill on completion tokens only).
* :func:`generate` — greedy (temperature 0) or sampled decoding with an explicit PRNG key, a
  ``lax.fori_loop`` over new tokens (fixed shapes, no KV cache: contexts are ≤ 32 tokens).
* :func:`train` — one optax training loop for full fine-tuning and LoRA (a ``mask`` freezes the
  other leaves via ``optax.multi_transform``/``set_to_zero``), a jitted ``lax.scan`` over the steps of
  each epoch, optional per-step metric (e.g. Δu along training).
* :func:`save_checkpoint` / :func:`restore_checkpoint` — orbax.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")


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


# --------------------------------------------------------------------------- LoRA


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters: rank r, scale α (ΔW = (α/r) A B), target module names."""
    rank: int = 4
    alpha: float = 8.0
    targets: Sequence[str] = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRAConfig.targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def _lora_sites(params, targets):
    """[(block_name, module_name)] of the Dense layers LoRA adapts, in a fixed order."""
    return [(b, m) for b in sorted(params) if b.startswith("block_") for m in targets if m in params[b]]


def init_lora(params: PyTree, lcfg: LoRAConfig, key) -> PyTree:
    """Adapters {block: {module: {"A": (in, r), "B": (r, out)}}}; A ~ N(0, 1/in), B = 0."""
    sites = _lora_sites(params, lcfg.targets)
    keys = jax.random.split(key, max(len(sites), 1))
    out: Dict[str, Dict[str, Dict[str, jax.Array]]] = {}
    for kk, (b, m) in zip(keys, sites):
        W = params[b][m]["kernel"]
        din, dout = W.shape
        out.setdefault(b, {})[m] = {"A": jax.random.normal(kk, (din, lcfg.rank), W.dtype) * float(din) ** -0.5,
                                    "B": jnp.zeros((lcfg.rank, dout), W.dtype)}
    return out


def merge_lora(base: PyTree, lora: PyTree, scale: float) -> PyTree:
    """θ = θ₀ with every adapted kernel W₀ replaced by W₀ + scale · A B (a new tree; pure)."""
    merged = jax.tree_util.tree_map(lambda x: x, base)  # shallow structural copy
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in merged.items()}
    for b, mods in lora.items():
        for m, ab in mods.items():
            layer = dict(merged[b][m])
            layer["kernel"] = layer["kernel"] + scale * (ab["A"] @ ab["B"])
            merged[b] = dict(merged[b])
            merged[b][m] = layer
    return merged


def lora_tree(base: PyTree, lora: PyTree) -> PyTree:
    """The LoRA training tree {"base": θ₀, "lora": adapters}."""
    return {"base": base, "lora": lora}


def lora_mask(tree: PyTree) -> PyTree:
    """Boolean mask over a LoRA training tree: True on adapter leaves, False on θ₀."""
    return {"base": jax.tree_util.tree_map(lambda _: False, tree["base"]),
            "lora": jax.tree_util.tree_map(lambda _: True, tree["lora"])}


def lora_merged_params(tree: PyTree, lcfg: LoRAConfig) -> PyTree:
    return merge_lora(tree["base"], tree["lora"], lcfg.scale)


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


# --------------------------------------------------------------------------- training


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
    ``mask`` (bool pytree like params) trains only the True leaves (LoRA: :func:`lora_mask`).
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
    mask_key = None if mask is None else (jax.tree_util.tree_structure(mask),
                                          tuple(bool(m) for m in jax.tree_util.tree_leaves(mask)))
    ck = (loss_fn, metric_fn, tc, total, bs, spe, metric_every, mask_key)
    if ck not in _EPOCH_CACHE:  # reuse compiled epochs across calls with the same functions and shapes
        if len(_EPOCH_CACHE) > 64:
            _EPOCH_CACHE.clear()
        tx = make_optimizer(tc, total, mask)
        _EPOCH_CACHE[ck] = (tx, _epoch_fn(loss_fn, tx, bs, spe, metric_fn, metric_every),
                            None if metric_fn is None else jax.jit(metric_fn))
    tx, run_epoch, metric_jit = _EPOCH_CACHE[ck]
    opt_state = tx.init(params)
    losses, metrics = [], []
    if metric_fn is not None:
        metrics.append(np.asarray(metric_jit(params))[None])
    for ep in range(tc.epochs):
        perm = jax.random.permutation(jax.random.fold_in(key, ep), N)
        params, opt_state, (l, mt) = run_epoch(params, opt_state, data, perm, ep * spe)
        losses.append(np.asarray(l))
        if metric_fn is not None:
            steps_done = ep * spe + np.arange(1, spe + 1)  # global step count after each update
            metrics.append(np.asarray(mt)[steps_done % metric_every == 0])
    hist = {"loss": np.concatenate(losses) if losses else np.zeros((0,))}
    if metric_fn is not None:
        hist["metric"] = np.concatenate(metrics)
        hist["step"] = np.arange(hist["metric"].shape[0]) * metric_every
    return params, hist


_EPOCH_CACHE: Dict[Any, Any] = {}


def _epoch_fn(loss_fn, tx, bs, spe, metric_fn, metric_every):
    @jax.jit
    def run_epoch(params, opt_state, data, perm, step0):
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

    return run_epoch


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, tree: PyTree) -> None:
    """Write a pytree of arrays to ``path`` (a new directory) with orbax."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, jax.tree_util.tree_map(np.asarray, tree), force=True)
        ckpt.wait_until_finished()


def restore_checkpoint(path: str, like: PyTree) -> PyTree:
    """Read a pytree saved by :func:`save_checkpoint`; ``like`` gives structure, shapes and dtypes."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckpt:
        out = ckpt.restore(path, jax.tree_util.tree_map(np.asarray, like))
    return jax.tree_util.tree_map(jnp.asarray, out)


# --------------------------------------------------------------------------- evaluation helpers


def answers(cfg: LMConfig, params: PyTree, data: Dict[str, np.ndarray], max_new: int = 8, *, key=None,
            temperature: float = 0.0, chunk: int = 256):
    """Generate answers (lists of words) for the prompts of a packed dataset."""
    from alignment_geom import lm_data

    out = []
    N = data["tokens"].shape[0]
    for s in range(0, N, chunk):
        sl = slice(s, min(s + chunk, N))
        k = None if key is None else jax.random.fold_in(key, s)
        toks = np.asarray(generate(cfg, params, data["tokens"][sl], data["prompt_len"][sl], max_new, key=k,
                                   temperature=temperature, eos_id=lm_data.EOS, pad_id=lm_data.PAD))
        out += [lm_data.answer_words(t, pl) for t, pl in zip(toks, data["prompt_len"][sl])]
    return out
