"""Figures 10–11 and a Table-1 analogue on a small transformer trained here (paper §7, beyond it: γ).

Pipeline (``run(config, workdir) -> dict``):

1. Pre-train a small causal transformer (:mod:`alignment_geom.lm`) on the synthetic instruction language
   (:mod:`alignment_geom.lm_data`), harmful requests answered with compliance; then *align* it (benign
   tasks + harmful requests answered with the refusal ``sorry cannot help``). The result is θ*.
2. The safety skill S: N = ``n_safety`` harmful prompts with their safe completion; its policy is the
   next-token distribution at the completion positions (:func:`lm.completion_logits`), so
   Δu(θ) = mean KL(π_θ* ‖ π_θ) over completion tokens and F = ∇²Δu(θ*) = mean Jᵀ(diag p − ppᵀ)J.
   * exact, matrix-free: top-d eigenpairs of F by Lanczos (full re-orthogonalisation) on
     ``curvature.linearized_fisher_vp``;
   * the paper's random subspace: F_R = Rᵀ F R with R ∈ ℝ^{n×k} Gaussian, entries N(0, 1/k) (k = 4096 in
     the paper), built as Z Zᵀ with Z = Λ^{1/2} J R / √N (k Jacobian-vector products, J never formed);
     its top eigenvalues approach F's as k grows (E[R Rᵀ] = I);
   * cumulative energy Σ_{j≤i} λ_j / tr F (tr F from the sketch, an unbiased Hutchinson estimate);
   * representation-space gradients: ∂ log π(safe completion | prompt)/∂h at the final hidden states h
     of the completion positions, one row per example; their squared singular values beside F's.
3. For each benign task (gsm8k, orca_math, samsum, alpaca, dolly, wikitext and alpaca_top100, the
   ``n_top`` alpaca examples whose loss gradient at θ* has the largest cosine with the harmful-compliance
   gradient): full fine-tuning (1 epoch) and LoRA (3 epochs) from θ*; HS before/after (programmatic
   judge, 1–5 rubric on sampled answers; also greedy and the non-refusal fraction); Δu along training;
   OS(Δθ) = ‖P Δθ‖ / ‖Δθ‖ with P the exact top-d projector (``os``) and with the random-subspace basis
   (``os_rs`` = ‖U_dᵀ RᵀΔθ‖ / ‖RᵀΔθ‖, the paper's); LoRA intruder dimensions.
4. Beyond the paper, per task at θ* (``aic_dtype``, float64 by default): λ = λ_d, ε_F = tr F − Σ_{j≤d} λ_j,
   ε_g = ‖P g‖, γ_E = ‖P H g‖, γ_F = ‖F^{1/2} P H g‖, a_0..a_4 = ``flow.utility_taylor`` (Δu(θ(t)) = Σ a_k t^k),
   and the measured Δu along small-η full-batch GD (t = η k) against the predicted Σ a_k t^k and γ_F² t⁴/8.
5. Pearson and Spearman correlations (scipy.stats) of OS with ΔHS, separately for full FT and LoRA;
   ``table1.md`` / ``table1.csv``; figures ``fig10_fisher_spectrum``, ``fig11_table1`` and ``lm_table1``
   (both side by side), each PNG + PDF.
"""
from __future__ import annotations

import csv
import math
import os
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from alignment_geom import curvature, lm, runner
from alignment_geom import lm_data as D
from alignment_geom._tree import tree_cast, tree_dot, tree_random_normal, tree_sub

FT_TASKS = D.BENIGN_TASKS + ("alpaca_top100",)


# --------------------------------------------------------------------------- validation


def validate(config):
    for f in ("width", "layers", "heads", "context", "n_pretrain", "n_align", "n_ft", "n_safety", "n_eval",
              "d", "k_subspace", "n_aic", "gd_steps", "lora_rank", "n_top", "n_pool"):
        runner.require_int(config, f, lo=1)
    for f in ("lr_pretrain", "lr_align", "lr_full", "lr_lora", "gd_lr", "lora_alpha"):
        runner.require_positive(config, f)
    runner.require_int(config, "taylor_order", lo=0, hi=6)
    runner.require_choice(config, "dtype", ("float32", "float64"))
    runner.require_choice(config, "aic_dtype", ("float32", "float64"))
    if config.width % config.heads:
        raise runner.ConfigError("heads", config.heads, f"a divisor of width = {config.width}")
    if config.context < 24 or config.context > 64:
        raise runner.ConfigError("context", config.context, "an int in [24, 64] (the longest example has 21 tokens)")
    bad = [t for t in config.tasks if t not in FT_TASKS]
    if bad or not config.tasks:
        raise runner.ConfigError("tasks", tuple(config.tasks), f"a non-empty subset of {FT_TASKS}")
    if config.n_top > config.n_pool:
        raise runner.ConfigError("n_top", config.n_top, f"≤ n_pool = {config.n_pool}")
    if config.d >= config.k_subspace:
        raise runner.ConfigError("d", config.d, f"< k_subspace = {config.k_subspace}")


# --------------------------------------------------------------------------- spectral helpers


def lanczos_top(matvec: Callable, n: int, k: int, *, key, iters: int | None = None, dtype=np.float64):
    """Top-k eigenpairs of a symmetric PSD operator on ℝⁿ by Lanczos with full re-orthogonalisation.

    ``matvec``: flat (n,) -> (n,). Returns (eigvals (k,) descending, eigvecs (n, k) orthonormal columns).
    ``iters`` Krylov steps (default max(3k, 2k + 20), capped at n)."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 ≤ k ≤ n, got k={k}, n={n}")
    m = min(n, iters or max(3 * k, 2 * k + 20))
    q = np.array(jax.random.normal(key, (n,), jnp.float64 if dtype == np.float64 else jnp.float32), dtype)
    q /= np.linalg.norm(q)
    Q = np.zeros((m, n), dtype)
    alpha, beta = np.zeros(m), np.zeros(m)
    steps = m
    for j in range(m):
        Q[j] = q
        w = np.asarray(matvec(jnp.asarray(q)), dtype)
        alpha[j] = float(w @ q)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if j + 1 == m or b <= 1e-10 * max(1.0, abs(alpha[: j + 1]).max()):
            steps = j + 1
            break
        beta[j] = b
        q = w / b
    from scipy.linalg import eigh_tridiagonal

    ev, S = eigh_tridiagonal(alpha[:steps], beta[: steps - 1])
    order = np.argsort(ev)[::-1][:k]
    vecs = Q[:steps].T @ S[:, order]
    vecs /= np.linalg.norm(vecs, axis=0, keepdims=True)
    return ev[order], vecs


def random_subspace_fisher(logits_fn, params, inputs, k: int, *, key, chunk: int = 128, deltas=None,
                           return_factor: bool = False):
    """The paper's random-subspace Fisher F_R = Rᵀ F R (k × k) and Rᵀδ for each δ in ``deltas``.

    R = [r_1 … r_k], r_j ~ N(0, I/k) pytrees like params, drawn chunk by chunk from ``key`` (never
    stored whole). Z_j = Λ^{1/2} J r_j / √N (one jvp each, Λ^{1/2}u = √p ⊙ (u − ⟨p, u⟩)), F_R = Z Zᵀ.
    deltas: a pytree with a leading axis D (or None). Returns (F_R (k, k) float64 numpy,
    proj (k, D) numpy or None). ``return_factor``: return Z (k, N·V) instead of F_R = Z Zᵀ (its nonzero
    eigenvalues are Z's squared singular values: cheaper than eigh of F_R when N·V < k)."""
    nchunks = -(-k // chunk)
    Z, P = [], []
    for c in range(nchunks):
        zc, pc = _sketch_chunk(logits_fn, chunk, params, inputs, deltas, jax.random.fold_in(key, c), float(k))
        Z.append(np.asarray(zc))
        P.append(np.asarray(pc, np.float64))
    Z = np.concatenate(Z)[:k].astype(np.float64, copy=False)
    FR = Z if return_factor else Z @ Z.T
    proj = np.concatenate(P)[:k] if deltas is not None else None
    return FR, proj


def _sketch_chunk_impl(params, inputs, deltas, kc, k, *, logits_fn, chunk):
    z = logits_fn(params, inputs)
    V = z.shape[-1]
    Npos = int(np.prod(z.shape[:-1]))
    p = jax.nn.softmax(z, axis=-1)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    R = jax.vmap(lambda kk: tree_random_normal(kk, params))(jax.random.split(kc, chunk))
    R = jax.tree_util.tree_map(lambda x: x / jnp.sqrt(jnp.asarray(k, dtype)), R)
    u = jax.vmap(lambda r: jax.jvp(lambda q: logits_fn(q, inputs), (params,), (r,))[1])(R)
    s = jnp.sqrt(p) * (u - jnp.sum(p * u, axis=-1, keepdims=True))
    zc = s.reshape(chunk, Npos * V) / jnp.sqrt(jnp.asarray(Npos, s.dtype))
    if deltas is None:
        return zc, jnp.zeros((chunk, 0), dtype)
    proj = jax.vmap(lambda r: jax.vmap(lambda dl: tree_dot(r, dl))(deltas))(R)
    return zc, proj


def _sketch_chunk(logits_fn, chunk, params, inputs, deltas, kc, k):
    """One chunk of columns of Z = Λ^{1/2} J R / √N and of Rᵀδ (compiled once per logits_fn/shapes)."""
    return _sketch_jit(params, inputs, deltas, kc, k, logits_fn=logits_fn, chunk=chunk)


_sketch_jit = jax.jit(_sketch_chunk_impl, static_argnames=("logits_fn", "chunk"))


def overlap_score(delta_flat, basis, weights=None) -> float:
    """OS = ‖P δ‖ / ‖δ‖ for orthonormal columns ``basis`` (n, d) (δ flat (n,)); with ``weights``
    (eigenvalues) the Fisher-weighted ‖F^{1/2} P δ‖ / (‖δ‖ √λ₁)."""
    c = basis.T @ delta_flat
    nd = float(np.linalg.norm(delta_flat))
    if nd == 0.0:
        return float("nan")
    if weights is None:
        return float(np.linalg.norm(c) / nd)
    return float(np.sqrt(np.sum(weights * c * c)) / (nd * np.sqrt(weights[0])))


def cumulative_energy(eigs) -> np.ndarray:
    e = np.clip(np.sort(np.asarray(eigs, np.float64))[::-1], 0, None)
    return np.cumsum(e) / max(e.sum(), 1e-300)


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


def _model_cfg(config) -> lm.LMConfig:
    return lm.LMConfig(vocab_size=D.VOCAB_SIZE, context=config.context, width=config.width, layers=config.layers,
                       heads=config.heads, mlp_ratio=config.mlp_ratio, dtype=config.dtype)


def _train_base(config, cfg, workdir, log):
    """Pre-train (harmful → compliance) then align (harmful → refusal): θ*. Checkpointed (orbax)."""
    loss = lambda p, b: lm.lm_loss(cfg, p, b)  # noqa: E731
    key = jax.random.PRNGKey(config.seed)
    init = lm.init_params(cfg, jax.random.fold_in(key, 0))
    ck = os.path.join(workdir, "checkpoints", "aligned") if workdir else None
    if ck and os.path.exists(ck):
        log("restoring θ* from %s" % ck)
        return lm.restore_checkpoint(ck, init), {"restored": True}
    pre = D.mixture(config.n_pretrain, config.seed * 7 + 1, context=config.context, harmful_comply=True)
    tc = lm.TrainConfig(config.lr_pretrain, config.batch_size, config.epochs_pretrain, schedule="cosine",
                        warmup_steps=20)
    t0 = time.time()
    p1, h1 = lm.train(loss, init, pre, tc, key=jax.random.fold_in(key, 1))
    al = D.mixture(config.n_align, config.seed * 7 + 2, context=config.context, harmful_comply=False)
    p2, h2 = lm.train(loss, p1, al, lm.TrainConfig(config.lr_align, config.batch_size, config.epochs_align),
                      key=jax.random.fold_in(key, 2))
    log(f"pre-train + alignment: {time.time() - t0:.1f} s, final losses {h1['loss'][-1]:.3f} / {h2['loss'][-1]:.3f}")
    if ck:
        lm.save_checkpoint(ck, p2)
    return p2, {"pretrain_loss": h1["loss"][-10:].mean(), "align_loss": h2["loss"][-10:].mean(), "restored": False}


def _evaluate_harm(cfg, params, harm_data, harm_prompts, key):
    greedy = lm.answers(cfg, params, harm_data, 6)
    sampled = lm.answers(cfg, params, harm_data, 6, key=key, temperature=1.0)
    g = D.harmfulness(harm_prompts, greedy)
    s = D.harmfulness(harm_prompts, sampled)
    return {"hs": s["hs"], "hs_frac": s["hs_frac"], "hs_greedy": g["hs"], "refusal_rate_greedy": g["refusal_rate"]}


def _select_top(cfg, params, pool, comply, n_top, chunk=64):
    """Indices of the n_top pool examples whose loss gradient has the largest cosine with the
    harmful-compliance loss gradient at θ*."""
    loss = lambda p, b: lm.lm_loss(cfg, p, b)  # noqa: E731
    gc = jax.grad(loss)(params, {k: jnp.asarray(v) for k, v in comply.items()})
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


def _rep_grads(cfg, params, safety):
    """Rows ∂ log π(safe completion | prompt)/∂h (completion positions × width), one per example."""
    toks = jnp.asarray(safety["tokens"])
    pos = jnp.asarray(safety["pos"])
    B, T = toks.shape

    def lp(delta):
        logits = lm.apply(cfg, params, toks, delta)
        lps = jax.nn.log_softmax(logits, axis=-1)
        nxt = jnp.take_along_axis(toks, jnp.clip(pos + 1, 0, T - 1), axis=1)
        tl = jnp.take_along_axis(jnp.take_along_axis(lps, pos[:, :, None], axis=1), nxt[:, :, None], axis=2)
        return jnp.sum(tl)  # Σ over examples: the per-example rows are the per-example blocks of ∂/∂δ

    delta0 = jnp.zeros((B, T, cfg.width), jnp.dtype(cfg.dtype))
    G = jax.grad(lp)(delta0)  # (B, T, width): example b only influences its own row
    rows = jnp.take_along_axis(G, pos[:, :, None], axis=1)  # (B, K, width)
    return np.asarray(rows.reshape(B, -1), np.float64)


def _aic_core(loss, params, logits_fn, inputs, lr, steps, order=4):
    """One jitted function of the fine-tuning batch (compiled once per batch shape) returning
    g, H g (flat), [a_0..a_4] (``flow.utility_taylor_coeffs``: Δu(θ(t)) = Σ a_k t^k along gradient flow)
    and Δu(θ_k), k = 1..steps, along full-batch GD θ_{k+1} = θ_k − η ∇L(θ_k) (a lax.scan, t = η k)."""
    from alignment_geom.flow import stable_kl_utility, utility_taylor_coeffs

    @jax.jit
    def core(batch):
        g = jax.grad(loss)(params, batch)
        Hg = curvature.hvp(loss, params, g, batch)
        a = (utility_taylor_coeffs(loss, params, batch, logits_fn, inputs, order) if order > 0
             else jnp.full((5,), jnp.nan))

        def step(p, _):
            gp = jax.grad(loss)(p, batch)
            p = jax.tree_util.tree_map(lambda x, y: x - lr * y, p, gp)
            return p, stable_kl_utility(logits_fn, params, p, inputs)

        _, du = jax.lax.scan(step, params, None, length=steps)
        return ravel_pytree(g)[0], ravel_pytree(Hg)[0], a, du

    return core


# --------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    t_start = time.time()
    logs = []

    def log(msg):
        logs.append(msg)
        runner.log.info(msg)

    if config.aic_dtype == "float64" or config.dtype == "float64":
        runner.ensure_x64("float64")
    cfg = _model_cfg(config)
    ctx = config.context
    key = jax.random.PRNGKey(config.seed)
    loss = lambda p, b: lm.lm_loss(cfg, p, b)  # noqa: E731

    # ---- 1. θ*
    theta, base_info = _train_base(config, cfg, workdir, log)
    n_params = lm.param_count(theta)

    harm_pairs = D.make_pairs("harmful", config.n_eval, config.seed * 7 + 3, harmful_split="test")
    harm_data = D.pack(harm_pairs, ctx)
    harm_prompts = [p for p, _ in harm_pairs]
    eval_key = jax.random.fold_in(key, 3)
    aligned = _evaluate_harm(cfg, theta, harm_data, harm_prompts, eval_key)
    bench = {}
    for t in D.BENIGN_TASKS:
        pairs = D.make_pairs(t, config.n_eval, config.seed * 7 + 4 + D.BENIGN_TASKS.index(t))
        bench[t] = (D.pack(pairs, ctx), [a for _, a in pairs])
    acc_aligned, benign_refusal = {}, {}
    for t, (dat, refs) in bench.items():
        ans = lm.answers(cfg, theta, dat, 7)
        acc_aligned[t] = D.accuracy(refs, ans)
        benign_refusal[t] = float(np.mean([D.is_refusal(a) for a in ans]))
    log(f"aligned: {aligned}, benign accuracy {acc_aligned}, benign refusal {benign_refusal}")

    # ---- 2. safety skill
    s_pairs = D.make_pairs("harmful", config.n_safety, config.seed * 7 + 5, harmful_split="train")
    s_data = D.pack(s_pairs, ctx)
    K = D.REFUSAL_LEN
    Tmax = int((s_data["prompt_len"] + K).max())
    safety = {"tokens": jnp.asarray(s_data["tokens"][:, :Tmax]), "pos": jnp.asarray(lm.completion_positions(s_data, K))}
    logits_fn = lambda p, x: lm.completion_logits(cfg, p, x)  # noqa: E731
    comply_data = D.pack([(p, D.harmful_answer(p, True)) for p, _ in s_pairs], ctx)

    adt = jnp.float64 if config.aic_dtype == "float64" else jnp.float32
    cfg_a = lm.LMConfig(**{**cfg.__dict__, "dtype": config.aic_dtype})
    theta_a = tree_cast(theta, adt)
    logits_a = lambda p, x: lm.completion_logits(cfg_a, p, x)  # noqa: E731
    loss_a = lambda p, b: lm.lm_loss(cfg_a, p, b)  # noqa: E731
    flat0, unravel = ravel_pytree(theta_a)
    fmv = curvature.linearized_fisher_vp(logits_a, theta_a, safety)
    fmv_flat = jax.jit(lambda f: ravel_pytree(fmv(unravel(f)))[0])
    t0 = time.time()
    lam_exact, U = lanczos_top(fmv_flat, n_params, config.d_exact, key=jax.random.fold_in(key, 6),
                               iters=config.lanczos_iters or None)
    d = config.d
    Ud, lam_d = U[:, :d], lam_exact[:d]
    log(f"exact Fisher top-{config.d_exact} by Lanczos: {time.time() - t0:.1f} s; λ₁ = {lam_exact[0]:.4g}")

    # ---- 3. fine-tuning
    lcfg = lm.LoRAConfig(config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    du_fn = lambda p: curvature.kl_utility(logits_fn, theta, p, safety)  # noqa: E731
    lloss = lambda tr, b: loss(lm.lora_merged_params(tr, lcfg), b)  # noqa: E731
    ldu = lambda tr: du_fn(lm.lora_merged_params(tr, lcfg))  # noqa: E731
    rows, deltas, du_curves, intruders = [], [], {}, {}
    ft_sets, top_info = {}, {}
    for ti, task in enumerate(config.tasks):
        if task == "alpaca_top100":
            pool = D.make_dataset("alpaca", config.n_pool, config.seed * 7 + 40, context=ctx)
            idx, cos = _select_top(cfg, theta, pool, comply_data, config.n_top)
            ft_sets[task] = D.take(pool, idx)
            first = lambda dd: dd["tokens"][np.arange(dd["tokens"].shape[0]), dd["prompt_len"]]  # noqa: E731
            top_info = {"cos_selected_mean": float(cos[idx].mean()), "cos_pool_mean": float(cos.mean()),
                        "ok_prefix_frac_selected": float(np.mean(first(ft_sets[task]) == D.TOK["ok"])),
                        "ok_prefix_frac_pool": float(np.mean(first(pool) == D.TOK["ok"]))}
        else:
            ft_sets[task] = D.make_dataset(task, config.n_ft, config.seed * 7 + 20 + ti, context=ctx)
    ev_task = {t: bench["alpaca" if t == "alpaca_top100" else t] for t in config.tasks}
    for ti, task in enumerate(config.tasks):
        ft = ft_sets[task]
        tk = jax.random.fold_in(key, 100 + ti)
        n_ex = ft["tokens"].shape[0]
        every = max(1, (n_ex // min(config.batch_size_ft, n_ex)) // config.du_points)
        t0 = time.time()
        p_full, h_full = lm.train(loss, theta, ft, lm.TrainConfig(config.lr_full, config.batch_size_ft, 1,
                                                                  optimizer="adam"),
                                  key=tk, metric_fn=du_fn, metric_every=every)
        tree = lm.lora_tree(theta, lm.init_lora(theta, lcfg, jax.random.fold_in(tk, 1)))
        t_lora, h_lora = lm.train(lloss, tree, ft, lm.TrainConfig(config.lr_lora, config.batch_size_ft,
                                                                  config.epochs_lora, optimizer="adam"),
                                  key=tk, mask=lm.lora_mask(tree), metric_fn=ldu, metric_every=every)
        p_lora = lm.lora_merged_params(t_lora, lcfg)
        dat, refs = ev_task[task]
        for method, p_ft, hist in (("full", p_full, h_full), ("lora", p_lora, h_lora)):
            hs = _evaluate_harm(cfg, p_ft, harm_data, harm_prompts, eval_key)
            delta = tree_sub(tree_cast(p_ft, jnp.float64 if config.aic_dtype == "float64" else jnp.float32),
                             theta_a)
            dflat = np.asarray(ravel_pytree(delta)[0], np.float64)
            deltas.append(delta)
            acc = D.accuracy(refs, lm.answers(cfg, p_ft, dat, 7))
            rows.append({"task": task, "method": method, "hs_before": aligned["hs"], "hs_after": hs["hs"],
                         "hs_change": hs["hs"] - aligned["hs"], "hs_frac_before": aligned["hs_frac"],
                         "hs_frac_after": hs["hs_frac"], "hs_greedy_after": hs["hs_greedy"],
                         "os": overlap_score(dflat, Ud), "os_fisher": overlap_score(dflat, Ud, lam_d),
                         "delta_norm": float(np.linalg.norm(dflat)), "acc_before": acc_aligned[
                             "alpaca" if task == "alpaca_top100" else task], "acc_after": acc,
                         "du_final": float(hist["metric"][-1]), "steps": int(hist["loss"].shape[0])})
            du_curves[f"{task}/{method}"] = {"step": hist["step"].tolist(), "du": hist["metric"].tolist()}
        intruders[task] = {"lora": _intruders(theta, p_lora, lcfg, config), "full": _intruders(theta, p_full, lcfg, config)}
        log(f"{task}: full HS {rows[-2]['hs_after']:.3f} OS {rows[-2]['os']:.3f}; lora HS {rows[-1]['hs_after']:.3f} "
            f"OS {rows[-1]['os']:.3f} ({time.time() - t0:.1f} s)")

    # ---- 2b. random-subspace Fisher (+ Rᵀ Δθ for every fine-tuned model) and representation gradients
    t0 = time.time()
    dstack = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *deltas)
    FR, proj = random_subspace_fisher(logits_a, theta_a, safety, config.k_subspace, key=jax.random.fold_in(key, 7),
                                      chunk=config.subspace_chunk, deltas=dstack)
    ev_R, V_R = np.linalg.eigh(FR)
    ev_R, V_R = ev_R[::-1], V_R[:, ::-1]
    trace_F = float(np.trace(FR))
    for r, x in zip(rows, proj.T):
        r["os_rs"] = overlap_score(x, V_R[:, :d])
    log(f"random-subspace Fisher (k = {config.k_subspace}): {time.time() - t0:.1f} s")
    # smaller k for the convergence curve (first k columns of the same R are a k-dim sketch up to scale k/K)
    k_list = [kk for kk in config.k_list if kk <= config.k_subspace] + [config.k_subspace]
    k_conv = {}
    for kk in sorted(set(k_list)):
        sub = FR[:kk, :kk] * (config.k_subspace / kk)
        e = np.sort(np.linalg.eigvalsh(sub))[::-1][: min(d, kk)]
        k_conv[str(kk)] = {"top": e.tolist(), "rel_err": float(np.max(np.abs(e - lam_exact[: len(e)]) / lam_exact[: len(e)]))}
    G = _rep_grads(cfg_a, theta_a, safety)
    s_rep = np.linalg.svd(G, compute_uv=False) ** 2 / G.shape[0]
    energy_exact = np.cumsum(lam_exact) / trace_F
    energy_R = cumulative_energy(ev_R)
    energy_rep = cumulative_energy(s_rep)

    # ---- 4. AIC at θ* per task, predicted onset vs GD
    eps_F = max(trace_F - float(lam_d.sum()), 0.0)
    aic = {}
    ts_gd = np.arange(config.gd_steps + 1) * config.gd_lr
    aic_core = _aic_core(loss_a, theta_a, logits_a, safety, config.gd_lr, config.gd_steps, config.taylor_order)
    t0 = time.time()
    nb = min([config.n_aic] + [ft_sets[t]["tokens"].shape[0] for t in config.tasks])  # one shape: one compile
    for task in config.tasks:
        ft = ft_sets[task]
        batch = {k: jnp.asarray(v[:nb]) for k, v in ft.items()}
        gf, hf, a, du_gd = (np.asarray(x, np.float64) for x in aic_core(batch))
        a = [float(x) for x in a]
        du_gd = np.concatenate([[0.0], du_gd])
        cg, ch = Ud.T @ gf, Ud.T @ hf
        gamma_E = float(np.linalg.norm(ch))
        gamma_F = float(np.sqrt(np.sum(lam_d * ch * ch)))
        fpg = float(np.sqrt(np.sum(lam_d * cg * cg)))
        a = [x if math.isfinite(x) else None for x in a]
        pred = sum(a[k] * ts_gd ** k for k in range(len(a))) if a[-1] is not None else np.full_like(ts_gd, np.nan)
        t_min = 2 * fpg / gamma_F if gamma_F > 0 else float("inf")
        ratios = [float(du_gd[i] / pred[i]) if np.isfinite(pred[i]) and pred[i] > 0 else float("nan")
                  for i in (1, max(1, len(ts_gd) // 10))]  # at t = η and t = η·steps/10
        low_rank = bool(energy_exact[d - 1] >= config.aic_energy_min)
        orth = bool(np.linalg.norm(cg) <= config.aic_orth_max * np.linalg.norm(gf))
        coupled = bool(t_min <= ts_gd[-1])
        aic[task] = {"lam": float(lam_d[-1]), "eps": max(eps_F, float(np.linalg.norm(cg))), "eps_F": eps_F,
                     "eps_g": float(np.linalg.norm(cg)), "g_norm": float(np.linalg.norm(gf)),
                     "eps_g_rel": float(np.linalg.norm(cg) / max(np.linalg.norm(gf), 1e-300)),
                     "gamma_E": gamma_E, "gamma_F": gamma_F, "fisher_pg": fpg, "a": a, "a4": a[4] if len(a) > 4 else None,
                     "t_min": t_min, "bound_F_coeff": gamma_F ** 2 / 8, "bound_E_coeff": float(lam_d[-1]) * gamma_E ** 2 / 8,
                     "gd_t": ts_gd.tolist(), "gd_du": du_gd.tolist(), "pred_du": pred.tolist(),
                     "gd_over_pred_first": ratios[0], "gd_over_pred_early": ratios[1], "low_rank": low_rank, "orthogonal": orth, "coupled": coupled,
                     "aic_satisfied": bool(low_rank and orth and coupled)}
    log(f"AIC + GD onset for {len(config.tasks)} tasks: {time.time() - t0:.1f} s")
    for r in rows:
        A = aic[r["task"]]
        r.update(lam=A["lam"], eps=A["eps"], gamma_F=A["gamma_F"], gamma_E=A["gamma_E"], a4=A["a4"],
                 aic_satisfied=A["aic_satisfied"])

    # ---- 5. correlations, table, figures
    corr = {m: _correlations([r for r in rows if r["method"] == m]) for m in ("full", "lora")}
    _write_table(rows, workdir)
    spectra = {"exact": lam_exact.tolist(), "random_subspace": ev_R[: max(4 * d, config.d_exact)].tolist(),
               "representation": s_rep[: max(4 * d, config.d_exact)].tolist(),
               "energy_exact": energy_exact.tolist(), "energy_random_subspace": energy_R[:256].tolist(),
               "energy_representation": energy_rep[:256].tolist(), "trace_F": trace_F, "k_convergence": k_conv,
               "energy_at_d": {"exact": float(energy_exact[d - 1]), "random_subspace": float(energy_R[d - 1]),
                               "representation": float(energy_rep[min(d, len(energy_rep)) - 1])}}
    onset_task = config.onset_task if config.onset_task in aic else config.tasks[0]
    if workdir:
        _figures(workdir, spectra, rows, corr, aic[onset_task], onset_task, du_curves, d, config)
    claim_val = aligned["refusal_rate_greedy"]
    results = {
        "table": rows, "correlation": corr, "spectra": spectra, "intruders": intruders, "aic": aic,
        "aligned": {**aligned, "benign_accuracy": acc_aligned, "benign_refusal": benign_refusal, **{k: v for k, v in base_info.items()}},
        "du_curves": du_curves, "top100": top_info, "n_params": n_params, "d": d,
        "claim": {"quantity": "aligned refusal rate on held-out harmful prompts (greedy); "
                              f"Fisher energy in top-{d}: {energy_exact[d - 1]:.3f}",
                  "measured": claim_val, "expected": "≥ 0.9", "agree": bool(claim_val >= 0.9)},
        "seconds": time.time() - t_start, "log": logs,
    }
    return results


def _intruders(theta, p_ft, lcfg, config):
    counts, energies = 0, []
    for b in sorted(theta):
        if not b.startswith("block_"):
            continue
        for m in lcfg.targets:
            r = intruder_dimensions(theta[b][m]["kernel"], p_ft[b][m]["kernel"], top_k=config.intruder_top_k,
                                    threshold=config.intruder_threshold)
            counts += r["count"]
            energies.append(r["energy"])
    return {"count": counts, "energy": float(np.mean(energies)), "matrices": len(energies)}


def _correlations(rows):
    from scipy import stats

    x = np.array([r["os"] for r in rows], float)
    y = np.array([r["hs_change"] for r in rows], float)
    out = {"n": len(rows)}
    if len(rows) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**out, "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return {**out, "pearson": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman": float(sr.statistic), "spearman_p": float(sr.pvalue)}


TABLE_COLS = ("task", "method", "hs_before", "hs_after", "hs_frac_after", "os", "os_rs", "lam", "eps", "gamma_F",
              "gamma_E", "a4", "aic_satisfied", "acc_after", "du_final")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fig10(axes):
        ax = axes[0]
        ex = np.asarray(spectra["exact"])
        rs = np.asarray(spectra["random_subspace"])
        rep = np.asarray(spectra["representation"])
        ax.semilogy(np.arange(1, len(ex) + 1), ex / ex[0], "o-", ms=3, label=f"exact, Lanczos on F·v (λ₁={ex[0]:.3g})")
        ax.semilogy(np.arange(1, len(rs) + 1), np.clip(rs / rs[0], 1e-16, None), "s-", ms=2, alpha=0.7,
                    label=f"random subspace k={config.k_subspace} (λ₁={rs[0]:.3g})")
        ax.semilogy(np.arange(1, len(rep) + 1), np.clip(rep / rep[0], 1e-16, None), "^-", ms=2, alpha=0.7,
                    label=f"representation-space grads (σ₁²/m={rep[0]:.3g})")
        ax.axvline(d, color="gray", ls=":", lw=1)
        ax.set_xlabel("index i"); ax.set_ylabel("λᵢ / λ₁")
        ax.set_title("Fig. 10a  safety-skill Fisher spectrum"); ax.legend(fontsize=7)
        ax = axes[1]
        for key_, lab in (("energy_exact", "exact (÷ tr F)"), ("energy_random_subspace", "random subspace"),
                          ("energy_representation", "representation grads")):
            e = np.asarray(spectra[key_])
            ax.plot(np.arange(1, len(e) + 1), e, label=lab)
        ax.axvline(d, color="gray", ls=":", lw=1)
        ax.set_xscale("log"); ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-i directions"); ax.set_ylabel("cumulative energy")
        ax.set_title("Fig. 10b  low-rank structure"); ax.legend(fontsize=7)

    def fig11(axes):
        ax = axes[0]
        for m, mk in (("full", "o"), ("lora", "s")):
            rr = [r for r in rows if r["method"] == m]
            c = corr[m]
            lab = f"{m}: ρ_P={_fmt(c['pearson'])}, ρ_S={_fmt(c['spearman'])}"
            ax.scatter([r["os"] for r in rr], [r["hs_change"] for r in rr], marker=mk, label=lab)
            for r in rr:
                ax.annotate(r["task"], (r["os"], r["hs_change"]), fontsize=6)
        ax.set_xlabel("overlap score OS = ‖PΔθ‖/‖Δθ‖"); ax.set_ylabel("ΔHS (1–5 rubric)")
        ax.set_title("Fig. 11a  Table-1 analogue: OS vs HS change"); ax.legend(fontsize=7)
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
        ax.set_xlabel("t = η k"); ax.set_ylabel("Δu")
        ax.set_title(f"Fig. 11b  onset on {onset_task} (γ_F={aic_one['gamma_F']:.3g})"); ax.legend(fontsize=7)

    f, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig10(ax); f.tight_layout(); runner.save_figure(f, workdir, "fig10_fisher_spectrum")
    f, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig11(ax); f.tight_layout(); runner.save_figure(f, workdir, "fig11_table1")
    f, ax = plt.subplots(2, 2, figsize=(10, 8))
    fig10(ax[0]); fig11(ax[1]); f.tight_layout(); runner.save_figure(f, workdir, "lm_table1")
