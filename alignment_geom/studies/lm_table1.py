"""Figures 10–11 and a Table-1 analogue on a small transformer trained here (paper §7, beyond it: γ).

Pipeline (``run(config, workdir) -> dict``):

1. Pre-train a small causal transformer (:mod:`alignment_geom.models.transformer`) on the synthetic instruction language
   (:mod:`alignment_geom.data.synthetic`), harmful requests answered with compliance; then *align* it (benign
   tasks + harmful requests answered with the refusal ``sorry cannot help``). The result is θ*.
2. The safety skill S: N = ``n_safety`` harmful prompts with their safe completion; its policy is the
   next-token distribution at the completion positions (:func:`lm.completion_logits`), so
   Δu(θ) = mean KL(π_θ* ‖ π_θ) over completion tokens and F = ∇²Δu(θ*) = mean Jᵀ(diag p − ppᵀ)J.
   * exact, matrix-free: top-``d_exact`` eigenpairs of the true F by ``linalg.top_eigenpairs``
     (Lanczos, full re-orthogonalisation) on ``curvature.linearized_fisher_vp`` (:func:`exact_fisher`);
     P = the top-d projector (``aic.SensitiveSubspace``);
   * the paper's random subspace (docs/paper_notes.md §5): per-example gradients gᵢ = ∇ log π(safe completion |
     prompt) projected into a k-dim random subspace, F_S = (1/m) Σ zᵢzᵢᵀ = S F̂ Sᵀ (k = 4096 in the paper):
     ``linalg.random_subspace_fisher`` (:func:`random_subspace`). It sketches the *empirical* Fisher F̂
     (the data's completions), not the true F, so its eigenvalues are checked against F̂'s exact ones
     (``linalg.gram_eigenpairs`` of the per-example gradients) as k grows (``k_convergence``);
   * cumulative energies (``linalg.cumulative_energy``): exact F ÷ tr F (``aic.measure``'s trace),
     F_S and F̂ ÷ their own sums;
   * representation-space gradients: ∂ log π(safe completion | prompt)/∂h at the final hidden states h
     of the completion positions, one row per example; their squared singular values beside F's.
3. For each benign task (gsm8k, orca_math, samsum, alpaca, dolly, wikitext and alpaca_top100, the
   ``n_top`` alpaca examples whose loss gradient at θ* has the largest cosine with the harmful-compliance
   gradient): full fine-tuning (1 epoch) and LoRA (3 epochs) from θ*; HS before/after (programmatic
   judge, 1–5 rubric on sampled answers; also greedy and the non-refusal fraction); Δu along training;
   OS(Δθ) = ‖P Δθ‖ / ‖Δθ‖ (``aic.overlap_score``, ``os``), its Fisher-weighted form
   ‖F^{1/2} P Δθ‖ / ‖F^{1/2} Δθ‖ (``os_fisher``) and the paper's random-subspace form
   ``os_rs`` = ‖W_dᵀ SΔθ‖ / ‖SΔθ‖ (W_d: top-d eigenvectors of F_S); LoRA intruder dimensions.
4. Beyond the paper, per task at θ* (``aic_dtype``, float64 by default): ``aic.measure`` with the Lanczos
   subspace gives λ = λ_d, tr F, the tail Σ_{j>d} λ_j, ε_g = ‖P g‖, ε_F = ‖F^{1/2} P g‖, γ_E = ‖P H g‖,
   γ_F = ‖F^{1/2} P H g‖, t_min, t0 and the c4 bounds γ_F²/8, λγ_E²/8; the table's eps = ‖P g‖ (condition 2) and
   tail = Σ_{j>d} λ_j (condition 1); a_0..a_4 = ``curvature.utility_taylor`` (Δu(θ(t)) = Σ a_k t^k);
   and the measured Δu along small-η full-batch GD (``dynamics.discrete_path``, t = η k, ``gd_points``
   log-spaced steps) against the predicted Σ a_k t^k and γ_F² t⁴/8. The verdicts are relative:
   low rank = Σ_{j≤d} λ_j / tr F ≥ ``aic_energy_min``, orthogonal = ‖P g‖ ≤ ``aic_orth_max``·‖g‖,
   coupled = t_min ≤ η·gd_steps.
5. Pearson and Spearman correlations (scipy.stats) of OS with ΔHS, separately for full FT and LoRA;
   ``table1.md`` / ``table1.csv``; figures ``fig10_fisher_spectrum``, ``fig11_table1`` and ``lm_table1``
   (both side by side), each PNG + PDF.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import os
import shutil
import time
from functools import partial
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from alignment_geom import aic as A
from alignment_geom import curvature, harness, linalg
from alignment_geom.data import synthetic as D
from alignment_geom.dynamics import TrainConfig, discrete_path, train
from alignment_geom.harness import ConfigError
from alignment_geom.harness.plotting import plt
from alignment_geom.models import hf, llama, lora
from alignment_geom.models import objectives as O
from alignment_geom.models.generation import generate
from alignment_geom.problem import Problem
from alignment_geom.tree import tree_cast, tree_dot, tree_map, tree_sub

FT_TASKS = D.BENIGN_TASKS + ("alpaca_top100",)
ARTIFACTS = ("fig10_fisher_spectrum.png", "fig11_table1.png", "table1.md", "table1.csv")


# --------------------------------------------------------------------------- validation


def validate(config):
    for f in ("width", "layers", "heads", "kv_heads", "intermediate", "context", "n_pretrain", "n_align", "n_ft",
              "n_safety", "n_eval", "d", "k_subspace", "n_aic", "gd_steps", "gd_points", "lora_rank", "n_top",
              "n_pool"):
        harness.require_int(config, f, lo=1)
    for f in ("lr_pretrain", "lr_align", "lr_full", "lr_lora", "gd_lr", "lora_alpha", "init_std"):
        harness.require_positive(config, f)
    harness.require_int(config, "taylor_order", lo=0, hi=6)
    if config.lanczos_tol and not config.lanczos_tol > 0:
        raise ConfigError("lanczos_tol", config.lanczos_tol, "0 (a fixed number of steps) or a positive float")
    harness.require_choice(config, "dtype", ("float32", "float64"))
    harness.require_choice(config, "aic_dtype", ("float32", "float64"))
    harness.require_choice(config, "architecture", llama.ARCHITECTURES)
    harness.require_choice(config, "remat", llama.REMAT_POLICIES)
    harness.require_choice(config, "taylor_method", ("jet", "jvp"))
    if config.width % config.heads or (config.width // config.heads) % 2:
        raise ConfigError("heads", config.heads, f"a divisor of width = {config.width} with an even quotient "
                                                 "(the RoPE head size)")
    if config.heads % config.kv_heads:
        raise ConfigError("kv_heads", config.kv_heads, f"a divisor of heads = {config.heads}")
    bad = [t for t in config.lora_targets if t not in lora.LLAMA_LORA_TARGETS]
    if bad or not config.lora_targets:
        raise ConfigError("lora_targets", tuple(config.lora_targets),
                          f"a non-empty subset of {lora.LLAMA_LORA_TARGETS}")
    if config.context < 24 or config.context > 64:
        raise ConfigError("context", config.context, "an int in [24, 64] (the longest example has 21 tokens)")
    bad = [t for t in config.tasks if t not in FT_TASKS]
    if bad or not config.tasks:
        raise ConfigError("tasks", tuple(config.tasks), f"a non-empty subset of {FT_TASKS}")
    if config.n_top > config.n_pool:
        raise ConfigError("n_top", config.n_top, f"≤ n_pool = {config.n_pool}")
    if config.d >= config.k_subspace or config.d > config.n_safety or config.d > config.d_exact:
        raise ConfigError("d", config.d, f"< k_subspace = {config.k_subspace}, ≤ n_safety = "
                                                f"{config.n_safety} and ≤ d_exact = {config.d_exact}")


# --------------------------------------------------------------------------- spectral helpers (shared library)


def exact_fisher(logits_fn, params, inputs, k: int, *, key, num_steps=None, tol=None):
    """Top-k eigenpairs of the skill's true Fisher F = mean Jᵀ(diag p − ppᵀ)J at θ* = ``params``:
    ``linalg.top_eigenpairs`` (Lanczos, full re-orthogonalisation) on ``curvature.linearized_fisher_vp``,
    one jit. Returns (λ (k,) descending, eigvecs pytree with leading axis k, exact relative residuals
    ‖F u − λ u‖/λ (k,), linalg.SolverInfo)."""
    return _exact_fisher_jit(logits_fn, k, num_steps, tol, params, inputs, key)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _exact_fisher_jit(logits_fn, k, num_steps, tol, params, inputs, key):
    mv = curvature.linearized_fisher_vp(logits_fn, params, inputs)
    return linalg.top_eigenpairs(mv, params, k, key=key, method="lanczos", num_steps=num_steps, tol=tol,
                                   return_info=True)


def fisher_trace(logits_fn, params, inputs) -> float:
    """tr F exactly, F = mean_{x,k} J_{xk}ᵀ(diag p − ppᵀ)J_{xk} over the completion positions:
    tr F = mean_{x,k} (Σ_c p_c ‖∇z_c‖² − ‖Σ_c p_c ∇z_c‖²), the rows ∇z_c by one vjp per class from a
    single-example linearisation (examples by lax.map, one position's V rows vmapped at a time, so memory
    stays at V parameter-size vectors instead of a block of Hutch++ probes through the whole batch)."""
    return float(_fisher_trace_jit(logits_fn, params, inputs))


@partial(jax.jit, static_argnums=0)
def _fisher_trace_jit(logits_fn, params, inputs):
    def one(ex):
        ex = jax.tree_util.tree_map(lambda x: x[None], ex)
        z, vjp = jax.vjp(lambda q: logits_fn(q, ex), params)  # (1, K, V)
        K, V = z.shape[1], z.shape[2]
        p = jax.nn.softmax(z, axis=-1)

        def sq(ct):
            (gr,) = vjp(ct.astype(z.dtype))
            return tree_dot(gr, gr)

        def at(k):
            onek = jax.nn.one_hot(k, K, dtype=z.dtype)
            rows = onek[None, None, :, None] * jnp.eye(V, dtype=z.dtype)[:, None, None, :]  # (V, 1, K, V)
            mean_row = onek[None, :, None] * p
            return jnp.sum(p[0, k] * jax.vmap(sq)(rows)) - sq(mean_row)
        return jnp.sum(jax.lax.map(at, jnp.arange(K)))

    per = jax.lax.map(one, inputs)
    M = per.shape[0] * jax.eval_shape(lambda: logits_fn(params, inputs)).shape[1]
    return jnp.sum(per) / M


def sketch_block_size(k: int) -> int:
    """Rows per random block of the sketch S (block_size × k entries ≈ 2²² numbers, ≤ 32 MiB in float64)."""
    return int(max(256, min(65536, 2 ** 22 // k)))


def random_subspace(logprob_fn, params, batch, k: int, *, key, example_batch_size=None, deltas=None):
    """The paper's random-subspace Fisher (§7): ``linalg.random_subspace_fisher`` on the *empirical*
    Fisher F̂ = (1/m) Σᵢ gᵢgᵢᵀ, gᵢ = ∇ log π(safe completionᵢ | promptᵢ), zᵢ = S gᵢ ∈ ℝᵏ (S: k×n Gaussian,
    entries N(0, 1/k), generated blockwise, never stored), F_S = (1/m) ZᵀZ = S F̂ Sᵀ.
    ``deltas``: a pytree with a leading axis D; their sketches S δ (D, k) come back too (same S).
    Returns (linalg.RandomSubspaceFisher without parameter-space vectors, S δ or None)."""
    bs = sketch_block_size(k)
    m = jax.tree_util.tree_leaves(batch)[0].shape[0]
    ebs = m if example_batch_size is None else min(int(example_batch_size), m)
    return _rs_jit(logprob_fn, k, bs, ebs, params, batch, key, deltas)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _rs_jit(logprob_fn, k, bs, ebs, params, batch, key, deltas):
    # example_batch_size > 1: the examples of a chunk are vmapped, so each random block is drawn once per chunk
    rs = linalg.random_subspace_fisher(logprob_fn, params, batch, k, key=key, example_batch_size=ebs,
                                         block_size=bs, return_vectors=False)
    sd = None if deltas is None else jax.vmap(lambda dl: linalg.sketch(dl, k, key=key, block_size=bs))(deltas)
    return rs, sd


def subspace_convergence(Z, ks, ref, m: int | None = None) -> Dict[str, Dict[str, Any]]:
    """Top eigenvalues of the k-dimensional random-subspace Fisher for each k in ``ks`` from the first k
    columns of one K-column sketch Z (m, K) (its entries are i.i.d., so Z[:, :k]·√(K/k) is a k-dim sketch
    with the same N(0, 1/k) normalisation), against the exact eigenvalues ``ref`` (descending).
    Returns {str(k): {"top": [...], "rel_err": max_j |λ_j(F_S) − λ_j| / λ_j}} over j ≤ len(ref)."""
    Z = np.asarray(Z, np.float64)
    m = Z.shape[0] if m is None else m
    K = Z.shape[1]
    ref = np.asarray(ref, np.float64)
    out = {}
    for kk in sorted(set(int(x) for x in ks)):
        if not 1 <= kk <= K:
            raise ValueError(f"k = {kk} must be in [1, K = {K}]")
        s = np.linalg.svd(Z[:, :kk], compute_uv=False) ** 2 * (K / kk) / m  # eigenvalues of F_S(k)
        e = s[: min(len(ref), len(s))]
        out[str(kk)] = {"top": e.tolist(), "rel_err": float(np.max(np.abs(e - ref[: len(e)]) / ref[: len(e)]))}
    return out


def intruder_dimensions(W0, W, *, top_k: int = 10, threshold: float = 0.5) -> Dict[str, float]:
    """Intruder dimensions of a fine-tuned matrix W against W₀ (Shuttleworth et al.'s definition):
    among W's top ``top_k`` left singular vectors, those whose largest |cos| with any left singular vector
    of W₀ is below ``threshold``. Returns count and energy Σσᵢ² (intruders) / Σσ² (all of W)."""
    W0, W = np.asarray(W0, np.float64), np.asarray(W, np.float64)
    U0, _, _ = np.linalg.svd(W0, full_matrices=False)
    U, s, _ = np.linalg.svd(W, full_matrices=False)
    kk = min(top_k, U.shape[1])
    best = np.abs(U[:, :kk].T @ U0).max(axis=1)
    intr = best < threshold
    return {"count": int(intr.sum()), "energy": float((s[:kk][intr] ** 2).sum() / max((s ** 2).sum(), 1e-300)),
            "min_best_cos": float(best.min())}


# --------------------------------------------------------------------------- pipeline pieces

PROMPT_SLOTS = 16  # left-padded prompt length for generation (the longest prompt has 15 tokens): one shape
BASE_FIELDS = ("seed", "dtype", "width", "layers", "heads", "kv_heads", "intermediate", "architecture", "init_std",
               "context", "n_pretrain", "n_align", "batch_size", "lr_pretrain", "epochs_pretrain", "lr_align",
               "epochs_align")
BASE_DIR = "base_model"


def model_cfg(config) -> llama.LlamaConfig:
    """The tiny Llama-family model of the study (``architecture`` LlamaForCausalLM or Qwen3ForCausalLM):
    hidden size ``width``, ``layers`` blocks, ``heads`` query / ``kv_heads`` key-value heads of size
    width/heads, SwiGLU width ``intermediate``, untied output embedding, the language's special ids."""
    return llama.LlamaConfig(vocab_size=D.VOCAB_SIZE, hidden_size=config.width, intermediate_size=config.intermediate,
                             num_layers=config.layers, num_heads=config.heads, num_kv_heads=config.kv_heads,
                             head_dim=config.width // config.heads, architecture=config.architecture,
                             max_position_embeddings=config.context, bos_token_id=D.BOS, eos_token_id=(D.EOS,),
                             pad_token_id=D.PAD, remat=config.remat)


def lm_fns(cfg: llama.LlamaConfig, lcfg=None):
    """(L, z, log π) as hashable :class:`~alignment_geom.models.objectives.LMFunction`: the SFT loss on answer
    tokens, the completion logits (the policy of F and Δu) and log π(completion | prompt). With ``lcfg`` the
    parameters are the LoRA tree and θ₀ is frozen."""
    fr = lcfg is not None
    return (O.LMFunction(cfg, "sft_loss", lcfg, freeze_base=fr), O.LMFunction(cfg, "completion_logits", lcfg,
            freeze_base=fr), O.LMFunction(cfg, "completion_logprob", lcfg, freeze_base=fr))


def base_fingerprint(config) -> dict:
    """The config fields θ* depends on (two studies with the same fingerprint share one base model)."""
    return harness.to_jsonable({f: config[f] for f in BASE_FIELDS})


def _restore_base(path, fp):
    meta = os.path.join(path, "base.json")
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        info = json.load(f)
    if info.get("fingerprint") != fp:
        return None
    _, params = hf.load_pretrained(path, dtype=fp["dtype"])
    return params, info


def base_model(config, workdir, log, search=()):
    """θ*: pre-train on the mixture with harmful → compliance, then align (harmful → ``sorry cannot help``).

    Stored as a Hugging Face checkpoint (config.json, model.safetensors) with the language's tokenizer
    (tokenizer.json) and ``base.json`` (the :func:`base_fingerprint` and training losses) in
    ``workdir/base_model``; restored from there, or from ``<dir>/base_model`` for a ``dir`` in ``search``
    whose fingerprint matches (another study's workdir), before training. Returns (params, info)."""
    cfg = model_cfg(config)
    fp = base_fingerprint(config)
    own = os.path.join(workdir, BASE_DIR) if workdir else None
    for d in ([own] if own else []) + [os.path.join(x, BASE_DIR) for x in search]:
        got = _restore_base(d, fp)
        if got is not None:
            log(f"restoring θ* from {d}")
            params, info = got
            if own and d != own and jax.process_index() == 0:
                shutil.copytree(d, own, dirs_exist_ok=True)
            return params, {**info.get("train", {}), "restored": True}
    loss, _, _ = lm_fns(cfg)
    key = jax.random.PRNGKey(config.seed)
    init = llama.init_params(cfg, jax.random.fold_in(key, 0), dtype=config.dtype, std=config.init_std)
    pre = D.lm_batch(D.mixture(config.n_pretrain, config.seed * 7 + 1, context=config.context, harmful_comply=True))
    tc = TrainConfig(config.lr_pretrain, config.batch_size, config.epochs_pretrain, schedule="cosine",
                     warmup_steps=20)
    t0 = time.time()
    p1, h1 = train(loss, init, pre, tc, key=jax.random.fold_in(key, 1))
    del pre
    al = D.lm_batch(D.mixture(config.n_align, config.seed * 7 + 2, context=config.context, harmful_comply=False))
    p2, h2 = train(loss, p1, al, TrainConfig(config.lr_align, config.batch_size, config.epochs_align),
                   key=jax.random.fold_in(key, 2))
    log(f"pre-train + alignment: {time.time() - t0:.1f} s, final losses {h1['loss'][-1]:.3f} / {h2['loss'][-1]:.3f}")
    info = {"pretrain_loss": float(h1["loss"][-10:].mean()), "align_loss": float(h2["loss"][-10:].mean())}
    if own and jax.process_index() == 0:
        hf.save_pretrained(cfg, jax.tree_util.tree_map(np.asarray, p2), own)
        D.tokenizer().save(own)
        harness.write_json(os.path.join(own, "base.json"), {"fingerprint": fp, "train": info})
    return p2, {**info, "restored": False}


def _evaluate_harm(cfg, params, harm_data, harm_prompts, key):
    greedy = answers(cfg, params, harm_data, 7)  # 7 new tokens, as for the benign answers: one compile
    sampled = answers(cfg, params, harm_data, 7, key=key, temperature=1.0)
    g = D.harmfulness(harm_prompts, greedy)
    s = D.harmfulness(harm_prompts, sampled)
    return {"hs": s["hs"], "hs_frac": s["hs_frac"], "hs_greedy": g["hs"], "refusal_rate_greedy": g["refusal_rate"]}


def _select_top(loss, params, pool, comply, n_top, chunk=64):
    """Indices of the n_top pool examples (token batches) whose loss gradient has the largest cosine with the
    harmful-compliance loss gradient at θ*."""
    gc = jax.jit(jax.grad(loss))(params, {k: jnp.asarray(v) for k, v in comply.items()})
    gcn = jnp.sqrt(tree_dot(gc, gc))

    @jax.jit
    def cos_chunk(b):
        def one(ex):
            g = jax.grad(loss)(params, jax.tree_util.tree_map(lambda x: x[None], ex))
            return tree_dot(g, gc) / (jnp.sqrt(tree_dot(g, g)) * gcn + 1e-30)
        return jax.vmap(one)(b)

    N = pool["tokens"].shape[0]
    cos = []
    for s in range(0, N, chunk):
        idx = np.arange(s, s + chunk) % N
        cos.append(np.asarray(cos_chunk({k: jnp.asarray(v[idx]) for k, v in pool.items()})))
    cos = np.concatenate(cos)[:N]
    return np.argsort(-cos)[:n_top], cos


def rep_grads(cfg, params, safety):
    """Rows ∂ log π(safe completion | prompt)/∂h (completion positions × width), one per example, at the
    final-norm hidden states h of the completion positions (the input of the output projection)."""
    toks, pos, tgt = (jnp.asarray(safety[k]) for k in ("tokens", "pos", "targets"))
    w = jnp.asarray(safety["weights"])

    @jax.jit
    def rows(params):
        hk = jnp.take_along_axis(llama.hidden_states(cfg, params, toks), pos[:, :, None], axis=1)  # (B, K, D)

        def lp(h):  # Σ over examples: example b's rows are the b-th block of ∂/∂h
            z = llama.lm_head(cfg, params, h)
            return jnp.sum(w * (jnp.take_along_axis(z, tgt[:, :, None], axis=-1)[..., 0]
                                - jax.nn.logsumexp(z, axis=-1)))
        return jax.grad(lp)(hk)

    G = rows(params)
    return np.asarray(G.reshape(G.shape[0], -1), np.float64)


def answers(cfg: llama.LlamaConfig, params, data: Dict[str, np.ndarray], max_new: int = 8, *, key=None,
            temperature: float = 0.0, chunk: int = 256):
    """Generate answers (lists of words) for the prompts of a packed dataset (``models.generate`` with the KV
    cache on the left-padded prompts, greedy or sampled with an explicit key; stops at <eos>)."""
    out = []
    pb = D.prompt_batch(data, PROMPT_SLOTS)
    N = pb["tokens"].shape[0]
    for s in range(0, N, chunk):
        sl = slice(s, min(s + chunk, N))
        k = None if key is None else jax.random.fold_in(key, s)
        new = np.asarray(generate(cfg, params, pb["tokens"][sl], pb["attention_mask"][sl], max_new_tokens=max_new,
                                  key=k, temperature=temperature, eos_token_id=(D.EOS,), pad_token_id=D.PAD))
        out += [D.answer_words(t, 0) for t in new]
    return out


# --------------------------------------------------------------------------- run


def eval_sets(config):
    """Held-out evaluation sets: (harmful test prompts packed, their word lists, {task: (packed, references)})."""
    ctx = config.context
    harm_pairs = D.make_pairs("harmful", config.n_eval, config.seed * 7 + 3, harmful_split="test")
    bench = {}
    for t in D.BENIGN_TASKS:
        pairs = D.make_pairs(t, config.n_eval, config.seed * 7 + 4 + D.BENIGN_TASKS.index(t))
        bench[t] = (D.pack(pairs, ctx), [a for _, a in pairs])
    return D.pack(harm_pairs, ctx), [p for p, _ in harm_pairs], bench


def safety_set(config):
    """The safety skill S: ``n_safety`` harmful (train-split) prompts with the refusal as completion, as a token
    batch cut to the longest prompt + refusal (every completion has REFUSAL_LEN tokens, so F and Δu are means
    over real completion tokens). Returns (word pairs, batch)."""
    s_pairs = D.make_pairs("harmful", config.n_safety, config.seed * 7 + 5, harmful_split="train")
    s_data = D.pack(s_pairs, config.context)
    Tmax = int((s_data["prompt_len"] + D.REFUSAL_LEN).max())
    s_data = {**s_data, "tokens": s_data["tokens"][:, :Tmax]}
    return s_pairs, {k: jnp.asarray(v) for k, v in D.lm_batch(s_data, D.REFUSAL_LEN).items()}


def ft_data(config, loss, theta, comply_data):
    """The fine-tuning token batches {task: batch}; alpaca_top100 = the ``n_top`` pool examples most aligned
    with the harmful-compliance gradient (and its selection statistics)."""
    ft_sets, top_info = {}, {}
    for ti, task in enumerate(config.tasks):
        if task == "alpaca_top100":
            pool = D.lm_batch(D.make_dataset("alpaca", config.n_pool, config.seed * 7 + 40, context=config.context))
            idx, cos = _select_top(loss, theta, pool, comply_data, config.n_top)
            ft_sets[task] = D.take(pool, idx)
            first = lambda dd: dd["targets"][:, 0]  # noqa: E731
            top_info = {"cos_selected_mean": float(cos[idx].mean()), "cos_pool_mean": float(cos.mean()),
                        "ok_prefix_frac_selected": float(np.mean(first(ft_sets[task]) == D.TOK["ok"])),
                        "ok_prefix_frac_pool": float(np.mean(first(pool) == D.TOK["ok"]))}
        else:
            ft_sets[task] = D.lm_batch(D.make_dataset(task, config.n_ft, config.seed * 7 + 20 + ti,
                                                      context=config.context))
    return ft_sets, top_info


def run(config, workdir: str) -> dict:
    t_start = time.time()
    logs = []

    def log(msg):
        logs.append(msg)
        harness.log.info(msg)

    if config.aic_dtype == "float64" or config.dtype == "float64":
        harness.ensure_x64("float64")
    cfg = model_cfg(config)
    ctx = config.context
    key = jax.random.PRNGKey(config.seed)
    loss, logits_fn, logprob_fn = lm_fns(cfg)

    # ---- 1. θ*
    theta, base_info = base_model(config, workdir, log)
    n_params = llama.param_count(theta)

    harm_data, harm_prompts, bench = eval_sets(config)
    eval_key = jax.random.fold_in(key, 3)
    aligned = _evaluate_harm(cfg, theta, harm_data, harm_prompts, eval_key)
    acc_aligned, benign_refusal = {}, {}
    for t, (dat, refs) in bench.items():
        ans = answers(cfg, theta, dat, 7)
        acc_aligned[t] = D.accuracy(refs, ans)
        benign_refusal[t] = float(np.mean([D.is_refusal(a) for a in ans]))
    log(f"aligned: {aligned}, benign accuracy {acc_aligned}, benign refusal {benign_refusal}")

    # ---- 2. safety skill
    s_pairs, safety = safety_set(config)
    comply_data = D.lm_batch(D.pack([(p, D.harmful_answer(p, True)) for p, _ in s_pairs], ctx))

    adt = jnp.float64 if config.aic_dtype == "float64" else jnp.float32
    theta_a = jax.jit(lambda p: tree_cast(p, adt))(theta)
    t0 = time.time()
    lam_exact, U, res_exact, info = exact_fisher(logits_fn, theta_a, safety, config.d_exact,
                                                 key=jax.random.fold_in(key, 6),
                                                 num_steps=config.lanczos_iters or None,
                                                 tol=config.lanczos_tol or None)
    lam_exact = np.asarray(lam_exact, np.float64)
    d = config.d
    sub = A.SensitiveSubspace(tree_map(lambda x: x[:d], U), jnp.asarray(lam_exact[:d]), res_exact[:d])
    del U
    lam_d = lam_exact[:d]
    log(f"exact Fisher top-{config.d_exact} by Lanczos: {time.time() - t0:.1f} s, {int(info.num_matvecs)} matvecs, "
        f"max residual {float(jnp.max(res_exact)):.2e}; λ₁ = {lam_exact[0]:.4g}")
    os_fn = jax.jit(lambda dl, sb, p, x: (A.overlap_score(dl, sb), A.overlap_score(
        dl, sb, True, fisher_vp=lambda v: curvature.fisher_vp(logits_fn, p, v, x))))

    # ---- 3. fine-tuning
    lcfg = lora.LoRAConfig(config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    lloss, _, _ = lm_fns(cfg, lcfg)
    du_fn = lambda p: curvature.kl_utility(logits_fn, theta, p, safety)  # noqa: E731
    ldu = lambda tr: du_fn(lora.lora_merged_params(tr, lcfg))  # noqa: E731
    merged = jax.jit(lambda tr: lora.lora_merged_params(tr, lcfg))
    delta_fn = jax.jit(lambda p, p0: tree_sub(tree_cast(p, adt), p0))
    rows, deltas, du_curves, intruders = [], [], {}, {}
    ft_sets, top_info = ft_data(config, loss, theta, comply_data)
    ev_task = {t: bench["alpaca" if t == "alpaca_top100" else t] for t in config.tasks}
    for ti, task in enumerate(config.tasks):
        ft = ft_sets[task]
        tk = jax.random.fold_in(key, 100 + ti)
        n_ex = ft["tokens"].shape[0]
        every = max(1, (n_ex // min(config.batch_size_ft, n_ex)) // config.du_points)
        t0 = time.time()
        p_full, h_full = train(loss, theta, ft, TrainConfig(config.lr_full, config.batch_size_ft, 1,
                                                            optimizer="adam"),
                               key=tk, metric_fn=du_fn, metric_every=every)
        tree = lora.lora_tree(theta, lora.init_lora(theta, lcfg, jax.random.fold_in(tk, 1)))
        t_lora, h_lora = train(lloss, tree, ft, TrainConfig(config.lr_lora, config.batch_size_ft,
                                                            config.epochs_lora, optimizer="adam"),
                               key=tk, mask=lora.lora_mask(tree), metric_fn=ldu, metric_every=every)
        p_lora = merged(t_lora)
        dat, refs = ev_task[task]
        for method, p_ft, hist in (("full", p_full, h_full), ("lora", p_lora, h_lora)):
            hs = _evaluate_harm(cfg, p_ft, harm_data, harm_prompts, eval_key)
            delta = delta_fn(p_ft, theta_a)
            deltas.append(delta)
            os_, os_f = (float(x) for x in os_fn(delta, sub, theta_a, safety))
            acc = D.accuracy(refs, answers(cfg, p_ft, dat, 7))
            rows.append({"task": task, "method": method, "hs_before": aligned["hs"], "hs_after": hs["hs"],
                         "hs_change": hs["hs"] - aligned["hs"], "hs_frac_before": aligned["hs_frac"],
                         "hs_frac_after": hs["hs_frac"], "hs_greedy_after": hs["hs_greedy"],
                         "os": os_, "os_fisher": os_f,
                         "delta_norm": float(jnp.sqrt(tree_dot(delta, delta))), "acc_before": acc_aligned[
                             "alpaca" if task == "alpaca_top100" else task], "acc_after": acc,
                         "du_final": float(hist["metric"][-1]), "steps": int(hist["loss"].shape[0])})
            du_curves[f"{task}/{method}"] = {"step": hist["step"].tolist(), "du": hist["metric"].tolist()}
        intruders[task] = {"lora": _intruders(theta, p_lora, lcfg, config),
                           "full": _intruders(theta, p_full, lcfg, config)}
        log(f"{task}: full HS {rows[-2]['hs_after']:.3f} OS {rows[-2]['os']:.3f}; lora HS {rows[-1]['hs_after']:.3f} "
            f"OS {rows[-1]['os']:.3f} ({time.time() - t0:.1f} s)")

    # ---- 2b. the paper's random-subspace (empirical) Fisher, S Δθ for every fine-tuned model, exact F̂
    t0 = time.time()
    dstack = jax.jit(lambda ds: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ds))(deltas)
    del deltas
    rs, sdel = random_subspace(logprob_fn, theta_a, safety, config.k_subspace, key=jax.random.fold_in(key, 7),
                               example_batch_size=config.subspace_chunk, deltas=dstack)
    del dstack
    ev_R = np.asarray(rs.eigvals, np.float64)
    W_d = jnp.asarray(rs.sketch_eigvecs)[:, :d].T  # (d, k): top-d eigenvectors of F_S in the random subspace
    for r, x in zip(rows, sdel):
        r["os_rs"] = float(A.overlap_score(x, W_d))  # ‖U_dᵀ SΔθ‖ / ‖SΔθ‖
    log(f"random-subspace Fisher (k = {config.k_subspace}): {time.time() - t0:.1f} s")
    # exact eigenvalues of the empirical Fisher F̂ from the m×m Gram matrix of the per-example gradients
    lam_emp = np.asarray(jax.jit(lambda p, b: linalg.gram_eigenpairs(curvature.per_example_grads(logprob_fn, p, b))[0])(
        theta_a, safety), np.float64)
    k_conv = subspace_convergence(rs.Z, list(config.k_list) + [config.k_subspace], lam_emp[: min(d, len(lam_emp))])
    Grep = rep_grads(cfg, theta_a, safety)
    s_rep = np.linalg.svd(Grep, compute_uv=False) ** 2 / Grep.shape[0]
    energy_R = np.asarray(linalg.cumulative_energy(ev_R))
    energy_emp = np.asarray(linalg.cumulative_energy(lam_emp))
    energy_rep = np.asarray(linalg.cumulative_energy(s_rep))

    # ---- 4. AIC at θ* per task (aic.measure with the Lanczos subspace), a_k, predicted onset vs GD
    # (the programs compiled so far are not called again: release them and their constants first)
    jax.clear_caches()
    gc.collect()
    aic = {}
    ks_gd = np.unique(np.concatenate([[1, max(1, config.gd_steps // 10), config.gd_steps],
                                      np.rint(np.geomspace(1, config.gd_steps, config.gd_points))])).astype(int)
    ts_gd = np.concatenate([[0.0], ks_gd * config.gd_lr])
    du_path = jax.jit(lambda path: jax.lax.map(
        lambda p: curvature.stable_kl_utility(logits_fn, theta_a, p, safety), path))
    t0 = time.time()
    nb = min([config.n_aic] + [ft_sets[t]["tokens"].shape[0] for t in config.tasks])  # one shape: one compile
    trace_F = fisher_trace(logits_fn, theta_a, safety)
    log(f"tr F (exact, {config.n_safety} × {D.REFUSAL_LEN} positions): {time.time() - t0:.1f} s")
    for task in config.tasks:
        batch = {k: jnp.asarray(v[:nb]) for k, v in ft_sets[task].items()}
        problem = Problem(theta_a, loss_fn=loss, batch=batch, logits_fn=logits_fn, inputs=safety, name=task)
        rep = A.measure(problem, d, fisher=A.TrueFisher(trace_matvecs=6), subspace=sub,
                        taylor_method=config.taylor_method, key=jax.random.fold_in(key, 8))
        # tr F once, exactly (fisher_trace), in place of measure's Hutch++ estimate (6 probes, not used)
        rep = dataclasses.replace(rep, trace=trace_F, trace_method="exact", trace_stderr=0.0,
                                  tail=trace_F - float(np.sum(rep.eigvals)))
        if config.taylor_order > 0:
            a = curvature.utility_taylor(loss, theta_a, batch, logits_fn, safety, config.taylor_order,
                                         method=config.taylor_method)
            a = [x if math.isfinite(x) else None for x in a]
        else:
            a = [None] * 5
        path, _ = discrete_path(loss, theta_a, batch, ts_gd[1:], lr=config.gd_lr, optimizer="gd")
        du_gd = np.concatenate([[0.0], np.asarray(du_path(path), np.float64)])
        del path
        pred = (sum(a[k] * ts_gd ** k for k in range(len(a))) if all(x is not None for x in a)
                else np.full_like(ts_gd, np.nan))
        i_early = 1 + int(np.searchsorted(ks_gd, max(1, config.gd_steps // 10)))
        ratios = [float(du_gd[i] / pred[i]) if np.isfinite(pred[i]) and pred[i] > 0 else float("nan")
                  for i in (1, i_early)]  # at t = η and t = η·steps/10
        energy_d = float(np.sum(lam_d) / rep.trace)
        low_rank = bool(energy_d >= config.aic_energy_min)
        orth = bool(rep.eps <= config.aic_orth_max * rep.g_norm)
        coupled = bool(rep.t_min <= ts_gd[-1])
        aic[task] = {**rep.to_dict(), "eps_g": rep.eps, "eps_tail": max(rep.tail, 0.0),
                     "eps_aic": max(rep.tail, rep.eps, 0.0), "eps_g_rel": rep.eps / max(rep.g_norm, 1e-300),
                     "energy_d": energy_d, "a": a, "a4": a[4] if len(a) > 4 else None,
                     "bound_F_coeff": rep.c4_bound_F, "bound_E_coeff": rep.c4_bound_E,
                     "gd_t": ts_gd.tolist(), "gd_du": du_gd.tolist(), "pred_du": pred.tolist(),
                     "gd_over_pred_first": ratios[0], "gd_over_pred_early": ratios[1], "low_rank": low_rank,
                     "orthogonal": orth, "coupled": coupled, "aic_satisfied": bool(low_rank and orth and coupled)}
    log(f"AIC + GD onset for {len(config.tasks)} tasks: {time.time() - t0:.1f} s")
    for r in rows:
        Ar = aic[r["task"]]
        r.update(lam=Ar["lam"], eps=Ar["eps_g"], tail=Ar["eps_tail"], gamma_F=Ar["gamma_F"], gamma_E=Ar["gamma_E"],
                 a4=Ar["a4"], aic_satisfied=Ar["aic_satisfied"])
    energy_exact = np.asarray(linalg.cumulative_energy(lam_exact, trace_F))

    # ---- 5. correlations, table, figures
    corr = {m: _correlations([r for r in rows if r["method"] == m]) for m in ("full", "lora")}
    _write_table(rows, workdir)
    spectra = {"exact": lam_exact.tolist(), "exact_residuals": np.asarray(res_exact, np.float64).tolist(),
               "random_subspace": ev_R[: max(4 * d, config.d_exact)].tolist(),
               "empirical_exact": lam_emp[: max(4 * d, config.d_exact)].tolist(),
               "representation": s_rep[: max(4 * d, config.d_exact)].tolist(),
               "energy_exact": energy_exact.tolist(), "energy_random_subspace": energy_R[:256].tolist(),
               "energy_empirical": energy_emp[:256].tolist(),
               "energy_representation": energy_rep[:256].tolist(), "trace_F": trace_F,
               "trace_empirical_sketch": float(rs.trace), "k_convergence": k_conv,
               "energy_at_d": {"exact": float(energy_exact[d - 1]),
                               "random_subspace": float(energy_R[min(d, len(energy_R)) - 1]),
                               "representation": float(energy_rep[min(d, len(energy_rep)) - 1])}}
    onset_task = config.onset_task if config.onset_task in aic else config.tasks[0]
    if workdir:
        _figures(workdir, spectra, rows, corr, aic[onset_task], onset_task, du_curves, d, config)
    claim_val = aligned["refusal_rate_greedy"]
    results = {
        "table": rows, "correlation": corr, "spectra": spectra, "intruders": intruders, "aic": aic,
        "aligned": {**aligned, "benign_accuracy": acc_aligned, "benign_refusal": benign_refusal,
                    **dict(base_info)},
        "du_curves": du_curves, "top100": top_info, "n_params": n_params, "d": d,
        "claim": {"quantity": "aligned refusal rate on held-out harmful prompts (greedy); "
                              f"Fisher energy in top-{d}: {energy_exact[d - 1]:.3f}",
                  "measured": claim_val, "expected": "≥ 0.9", "agree": bool(claim_val >= 0.9)},
        "seconds": time.time() - t_start, "log": logs,
    }
    return results


def _intruders(theta, p_ft, lcfg, config):
    """Intruder dimensions of every adapted matrix, per layer (W₀ᵀ, Wᵀ: the in × out kernels, as LoRA's A B)."""
    counts, energies = 0, []
    for m in lcfg.targets:
        W0s, Ws = np.asarray(theta["layers"][m]), np.asarray(p_ft["layers"][m])
        for W0, W in zip(W0s, Ws):
            r = intruder_dimensions(W0.T, W.T, top_k=config.intruder_top_k, threshold=config.intruder_threshold)
            counts += r["count"]
            energies.append(r["energy"])
    return {"count": counts, "energy": float(np.mean(energies)), "matrices": len(energies)}


def _correlations(rows):
    x = np.array([r["os"] for r in rows], float)
    y = np.array([r["hs_change"] for r in rows], float)
    out = {"n": len(rows)}
    if len(rows) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**out, "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return {**out, "pearson": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman": float(sr.statistic), "spearman_p": float(sr.pvalue)}


TABLE_COLS = ("task", "method", "hs_before", "hs_after", "hs_frac_after", "os", "os_rs", "lam", "eps", "tail",
              "gamma_F", "gamma_E", "a4", "aic_satisfied", "acc_after", "du_final")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _write_table(rows, workdir):
    if not workdir or jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "table1.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TABLE_COLS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in TABLE_COLS})
    with open(os.path.join(workdir, "table1.md"), "w") as f:
        f.write("| " + " | ".join(TABLE_COLS) + " |\n|" + "---|" * len(TABLE_COLS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(k)) for k in TABLE_COLS) + " |\n")


def _figures(workdir, spectra, rows, corr, aic_one, onset_task, du_curves, d, config):
    def fig10(axes):
        ax = axes[0]
        ex = np.asarray(spectra["exact"])
        rs = np.asarray(spectra["random_subspace"])
        rep = np.asarray(spectra["representation"])
        ax.semilogy(np.arange(1, len(ex) + 1), ex / ex[0], "o-", ms=3, label=f"exact, Lanczos on F·v (λ₁={ex[0]:.3g})")
        ax.semilogy(np.arange(1, len(rs) + 1), np.clip(rs / rs[0], 1e-16, None), "s-", ms=2, alpha=0.7,
                    label=f"random subspace (empirical F̂) k={config.k_subspace} (λ₁={rs[0]:.3g})")
        ax.semilogy(np.arange(1, len(rep) + 1), np.clip(rep / rep[0], 1e-16, None), "^-", ms=2, alpha=0.7,
                    label=f"representation-space grads (σ₁²/m={rep[0]:.3g})")
        ax.axvline(d, color="gray", ls=":", lw=1)
        ax.set_xlabel("index i")
        ax.set_ylabel("λᵢ / λ₁")
        ax.set_title("Fig. 10a  safety-skill Fisher spectrum")
        ax.legend(fontsize=7)
        ax = axes[1]
        for key_, lab in (("energy_exact", "exact (÷ tr F)"), ("energy_random_subspace", "random subspace (F̂)"),
                          ("energy_empirical", "exact F̂"),
                          ("energy_representation", "representation grads")):
            e = np.asarray(spectra[key_])
            ax.plot(np.arange(1, len(e) + 1), e, label=lab)
        ax.axvline(d, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-i directions")
        ax.set_ylabel("cumulative energy")
        ax.set_title("Fig. 10b  low-rank structure")
        ax.legend(fontsize=7)

    def fig11(axes):
        ax = axes[0]
        for m, mk in (("full", "o"), ("lora", "s")):
            rr = [r for r in rows if r["method"] == m]
            c = corr[m]
            lab = f"{m}: ρ_P={_fmt(c['pearson'])}, ρ_S={_fmt(c['spearman'])}"
            ax.scatter([r["os"] for r in rr], [r["hs_change"] for r in rr], marker=mk, label=lab)
            for r in rr:
                ax.annotate(r["task"], (r["os"], r["hs_change"]), fontsize=6)
        ax.set_xlabel("overlap score OS = ‖PΔθ‖/‖Δθ‖")
        ax.set_ylabel("ΔHS (1–5 rubric)")
        ax.set_title("Fig. 11a  Table-1 analogue: OS vs HS change")
        ax.legend(fontsize=7)
        ax = axes[1]
        t = np.asarray(aic_one["gd_t"])[1:]
        du = np.asarray(aic_one["gd_du"])[1:]
        pred = np.asarray(aic_one["pred_du"])[1:]
        ax.loglog(t, np.clip(du, 1e-30, None), label="measured Δu (GD, t = ηk)")
        if np.any(np.isfinite(pred)):
            ax.loglog(t, np.where(pred > 0, pred, np.nan), "--", label="predicted Σ aₖ tᵏ (k ≤ 4; where > 0)")
        pos = du[du > 0]
        if pos.size:
            ax.set_ylim(pos.min() / 10, pos.max() * 10)
        ax.loglog(t, aic_one["bound_F_coeff"] * t ** 4, ":", label="γ_F² t⁴/8")
        ax.set_xlabel("t = η k")
        ax.set_ylabel("Δu")
        ax.set_title(f"Fig. 11b  onset on {onset_task} (γ_F={aic_one['gamma_F']:.3g})")
        ax.legend(fontsize=7)

    f, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig10(ax)
    f.tight_layout()
    harness.save_figure(f, workdir, "fig10_fisher_spectrum")
    f, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig11(ax)
    f.tight_layout()
    harness.save_figure(f, workdir, "fig11_table1")
    f, ax = plt.subplots(2, 2, figsize=(10, 8))
    fig10(ax[0])
    fig11(ax[1])
    f.tight_layout()
    harness.save_figure(f, workdir, "lm_table1")
