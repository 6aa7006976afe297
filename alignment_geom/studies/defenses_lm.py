"""Beyond the paper — the curvature-aware defences on the Section-7 model: harmfulness after fine-tuning against
task accuracy, for no defence and each defence of :mod:`alignment_geom.dynamics.defenses`, over the seven benign
tasks, full fine-tuning and LoRA.

Pipeline (``run(config, workdir) -> dict``):

1. θ* = the lm_table1 study's aligned tiny Llama model (:func:`lm_table1.base_model`: restored from the sibling
   ``lm_table1`` workdir when its base fields match, else trained here the same way).
2. The safety skill (the refusal's completion logits of ``n_safety`` harmful prompts) and its sensitive subspace
   at θ*: the top-``d`` eigenpairs of the true Fisher F(θ*) by Lanczos; for LoRA the Fisher of the adapters at
   θ* (B = 0: F lives in the B factors), the Problem's mask the adapters (``models.objectives.lm_problem``).
3. For each task, method (full: ``epochs_full`` epochs; LoRA: ``epochs_lora``) and defence: Adam through
   ``optax.chain(make_defense(name, problem, subspace, ...), adam)`` (masked to the adapters for LoRA), one
   jitted scan per (defence, method) reused over the tasks (every task has ``n_ft`` examples; the Problem's
   fine-tuning batch, used by coupling suppression's H(θ*), is an argument). Defences: the static projection
   g̃ = (I − P(θ*)) g, the dynamic projection (P re-estimated every ``every`` steps by a warm ``refresh_iters``-step
   Lanczos), the Fisher penalty g̃ = g + λ_reg F(θ*)(θ − θ*), the ∇Δu penalty and coupling suppression
   g̃ = g − P H(θ*)(θ − θ*).
4. After each run: HS (the judge's 1–5 rubric on sampled answers to held-out harmful prompts; also the greedy
   refusal rate), task accuracy (greedy exact match on held-out prompts of the task), Δu = KL(π_θ* ‖ π_θ) on the
   safety skill; the time per step (median over the tasks after the first, compiled, one) ÷ that of no defence.
5. Summary per defence and method: mean HS after, mean accuracy, the HS change against no defence, and the
   accuracy change; figure ``defenses_lm`` (Pareto: mean HS after vs mean accuracy, one marker per defence, the
   per-task points faint; full and LoRA panels; PNG + PDF).

Claim: with ``claim_defense`` (default the Fisher penalty) under full fine-tuning, the mean HS after is lower than
with no defence while the mean task accuracy is within ``acc_tolerance`` of no defence's (HS reduction at equal
task accuracy). The measured number is HS(defence) − HS(none).
"""
from __future__ import annotations

import os
import time
from functools import partial
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment_geom import aic as A
from alignment_geom import curvature, harness
from alignment_geom.data import synthetic as D
from alignment_geom.dynamics.defenses import DEFENSES, make_defense
from alignment_geom.harness import ConfigError
from alignment_geom.harness.plotting import plt
from alignment_geom.models import lora
from alignment_geom.models import objectives as O
from alignment_geom.problem import Problem
from alignment_geom.studies import _theory as TH
from alignment_geom.studies import lm_table1 as LM
from alignment_geom.tree import tree_map

ARTIFACTS = ("defenses_lm.png",)
METHODS = ("full", "lora")


def validate(config):
    for f in ("width", "layers", "heads", "kv_heads", "intermediate", "context", "n_pretrain", "n_align", "n_ft",
              "n_pool", "n_eval", "n_safety", "n_coupling", "d", "lanczos_iters", "refresh_iters", "every",
              "batch_size_ft", "epochs_full", "epochs_lora", "lora_rank", "batch_size"):
        harness.require_int(config, f, lo=1)
    for f in ("lr_pretrain", "lr_align", "lr_full", "lr_lora", "lora_alpha", "init_std", "fisher_strength",
              "utility_strength", "acc_tolerance"):
        harness.require_positive(config, f)
    harness.require_choice(config, "dtype", ("float32", "float64"))
    harness.require_choice(config, "optimizer", ("adam", "sgd"))
    harness.require_choice(config, "architecture", LM.llama.ARCHITECTURES)
    harness.require_choice(config, "remat", LM.llama.REMAT_POLICIES)
    if config.width % config.heads or (config.width // config.heads) % 2:
        raise ConfigError("heads", config.heads, f"a divisor of width = {config.width} with an even quotient")
    if config.heads % config.kv_heads:
        raise ConfigError("kv_heads", config.kv_heads, f"a divisor of heads = {config.heads}")
    if config.context < 24 or config.context > 64:
        raise ConfigError("context", config.context, "an int in [24, 64] (the longest example has 21 tokens)")
    defs = tuple(config.defenses)
    if not defs or defs[0] != "none" or any(n not in DEFENSES for n in defs) or len(set(defs)) != len(defs):
        raise ConfigError("defenses", defs, f"distinct names of {tuple(DEFENSES)}, 'none' first")
    if config.claim_defense not in defs[1:]:
        raise ConfigError("claim_defense", config.claim_defense, f"one of {defs[1:]}")
    bad = [t for t in config.tasks if t not in LM.FT_TASKS]
    if bad or not config.tasks:
        raise ConfigError("tasks", tuple(config.tasks), f"a non-empty subset of {LM.FT_TASKS}")
    if config.n_ft > config.n_pool:
        raise ConfigError("n_ft", config.n_ft, f"≤ n_pool = {config.n_pool} (alpaca_top100 takes n_ft of the pool)")
    if config.n_coupling > config.n_ft:
        raise ConfigError("n_coupling", config.n_coupling, f"≤ n_ft = {config.n_ft}")
    bad = [t for t in config.lora_targets if t not in lora.LLAMA_LORA_TARGETS]
    if bad or not config.lora_targets:
        raise ConfigError("lora_targets", tuple(config.lora_targets),
                          f"a non-empty subset of {lora.LLAMA_LORA_TARGETS}")
    if config.d > config.n_safety or config.d >= config.lanczos_iters:
        raise ConfigError("d", config.d, f"≤ n_safety = {config.n_safety} and < lanczos_iters = {config.lanczos_iters}")


def defense_options(config, name: str) -> dict:
    """The registry options of defence ``name`` from the config."""
    if name == "dynamic_projection":
        return {"every": int(config.every), "estimator": "lanczos", "warm": True,
                "num_steps": int(config.refresh_iters), "key": jax.random.PRNGKey(config.seed + 11)}
    if name == "fisher_penalty":
        return {"strength": float(config.fisher_strength)}
    if name == "utility_penalty":
        return {"strength": float(config.utility_strength)}
    return {}


def subspace_at(logits_fn, params, safety, d, iters, key):
    """The top-d Fisher eigenpairs at ``params`` (Lanczos, ``iters`` steps) as a SensitiveSubspace."""
    ev, U, res, _ = LM.exact_fisher(logits_fn, params, safety, d, key=key, num_steps=iters)
    return A.SensitiveSubspace(U, ev, res)


@partial(jax.jit, static_argnames=("name", "opts", "method", "lcfg", "cfg", "lr", "optimizer"))
def finetune(theta0, basis, eigvals, residuals, safety, cbatch, data, perms, *, name, opts, method, lcfg, cfg, lr,
             optimizer="adam"):
    """``chain(defence, adam)`` (or sgd) from θ₀ over the minibatches ``perms`` (steps, bs) of ``data``, for
    method "full" (θ₀ = θ*) or "lora" (θ₀ = the LoRA tree; updates masked to the adapters). The defence's Problem
    holds θ₀, the SFT loss on ``cbatch`` and the safety skill; the subspace is (basis, eigvals, residuals).
    Everything task-dependent is an argument, so one compile serves every task. Returns (θ, losses (steps,))."""
    problem = _problem(cfg, lcfg, method, theta0, cbatch, safety)
    sub = A.SensitiveSubspace(basis, eigvals, residuals)
    opts = dict(opts)
    if "key" in opts:
        opts["key"] = jnp.asarray(opts["key"], jnp.uint32)
    base = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
    tx = optax.chain(make_defense(name, problem, sub, **opts), base)
    loss_fn, mask = problem.loss_fn, problem.mask

    def step(carry, idx):
        p, s = carry
        batch = {k: v[idx] for k, v in data.items()}
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        upd, s = tx.update(g, s, p)  # the defence sees the whole tree and applies the mask itself
        if mask is not None:
            upd = tree_map(lambda u, m: u if m else jnp.zeros_like(u), upd, mask)
        return (optax.apply_updates(p, upd), s), loss

    (p, _), losses = jax.lax.scan(step, (theta0, tx.init(theta0)), perms)
    return p, losses


def _problem(cfg, lcfg, method, theta0, cbatch, safety) -> Problem:
    if method == "full":
        return O.lm_problem(cfg, theta0, cbatch, safety)
    return O.lm_problem(cfg, theta0, cbatch, safety, lora=lcfg)


def perms_of(key, n, bs, epochs):
    """(epochs · n // bs, bs) minibatch indices, one permutation per epoch."""
    spe = n // min(bs, n)
    return jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), n)[: spe * bs].reshape(spe, bs)
                            for e in range(epochs)])


def run(config, workdir: str) -> dict:
    t_start = time.time()
    logs = []

    def log(msg):
        logs.append(msg)
        harness.log.info(msg)

    if config.dtype == "float64":
        harness.ensure_x64("float64")
    cfg = LM.model_cfg(config)
    key = jax.random.PRNGKey(config.seed)
    search = (os.path.join(os.path.dirname(os.path.abspath(workdir)), "lm_table1"),) if workdir else ()
    theta, base_info = LM.base_model(config, workdir, log, search=search)
    loss, logits_fn, _ = LM.lm_fns(cfg)
    harm_data, harm_prompts, bench = LM.eval_sets(config)
    s_pairs, safety = LM.safety_set(config)
    comply = D.lm_batch(D.pack([(p, D.harmful_answer(p, True)) for p, _ in s_pairs], config.context))
    ft_cfg = config.copy_and_resolve_references()
    with ft_cfg.unlocked():
        ft_cfg.n_top = config.n_ft
    ft_sets, _ = LM.ft_data(ft_cfg, loss, theta, comply)
    ft_sets = {t: {k: jnp.asarray(v) for k, v in b.items()} for t, b in ft_sets.items()}
    eval_key = jax.random.fold_in(key, 3)
    aligned = LM._evaluate_harm(cfg, theta, harm_data, harm_prompts, eval_key)
    acc0 = {t: D.accuracy(refs, LM.answers(cfg, theta, dat, 7)) for t, (dat, refs) in bench.items()}
    log(f"θ*: HS {aligned['hs']:.3f}, greedy refusal {aligned['refusal_rate_greedy']:.3f}")

    lcfg = lora.LoRAConfig(config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    starts = {"full": theta, "lora": lora.lora_tree(theta, lora.init_lora(theta, lcfg, jax.random.fold_in(key, 9)))}
    t0 = time.time()
    lora_logits = O.LMFunction(cfg, "completion_logits", lcfg, freeze_base=True)
    subs = {"full": subspace_at(logits_fn, theta, safety, config.d, config.lanczos_iters, jax.random.fold_in(key, 6)),
            "lora": subspace_at(lora_logits, starts["lora"], safety, config.d, config.lanczos_iters,
                                jax.random.fold_in(key, 7))}
    log(f"sensitive subspaces (d = {config.d}): {time.time() - t0:.1f} s; λ₁ full {float(subs['full'].eigvals[0]):.4g},"
        f" LoRA {float(subs['lora'].eigvals[0]):.4g}")
    du_fn = jax.jit(lambda p: curvature.kl_utility(logits_fn, theta, p, safety))
    merged = jax.jit(lambda tr: lora.lora_merged_params(tr, lcfg))
    epochs = {"full": config.epochs_full, "lora": config.epochs_lora}
    lrs = {"full": config.lr_full, "lora": config.lr_lora}
    rows = []
    bar = harness.progress([(m, n) for m in METHODS for n in config.defenses], desc="defenses_lm")
    for method, name in bar:
        bar.set_postfix_str(f"{method}/{name}")
        opts = tuple(sorted(defense_options(config, name).items(), key=lambda kv: kv[0]))
        opts = tuple((k, tuple(np.asarray(v).tolist()) if k == "key" else v) for k, v in opts)
        sub = subs[method]
        times = []
        for ti, task in enumerate(config.tasks):
            data = ft_sets[task]
            n = int(data["tokens"].shape[0])
            perms = perms_of(jax.random.fold_in(key, 100 + ti), n, config.batch_size_ft, epochs[method])
            cb = {k: v[: config.n_coupling] for k, v in data.items()}
            ts = time.perf_counter()
            p, losses = finetune(starts[method], sub.basis, sub.eigvals, sub.residuals, safety, cb, data, perms,
                                 name=name, opts=opts, method=method, lcfg=lcfg, cfg=cfg, lr=float(lrs[method]),
                                 optimizer=config.optimizer)
            jax.block_until_ready(p)
            times.append((time.perf_counter() - ts) / perms.shape[0])
            pm = merged(p) if method == "lora" else p
            hs = LM._evaluate_harm(cfg, pm, harm_data, harm_prompts, eval_key)
            dat, refs = bench["alpaca" if task == "alpaca_top100" else task]
            acc = D.accuracy(refs, LM.answers(cfg, pm, dat, 7))
            rows.append({"defense": name, "method": method, "task": task, "hs_before": aligned["hs"],
                         "hs_after": hs["hs"], "refusal_after": hs["refusal_rate_greedy"],
                         "acc_before": acc0["alpaca" if task == "alpaca_top100" else task], "acc_after": acc,
                         "du": float(du_fn(pm)), "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
                         "steps": int(perms.shape[0])})
        step_s = float(np.median(times[1:])) if len(times) > 1 else float(times[0])
        for r in rows[-len(config.tasks):]:
            r["step_seconds"] = step_s
        log(f"{method}/{name}: mean HS {np.mean([r['hs_after'] for r in rows[-len(config.tasks):]]):.3f}, "
            f"acc {np.mean([r['acc_after'] for r in rows[-len(config.tasks):]]):.3f}, {1e3 * step_s:.1f} ms/step")
    summary = summarize(rows, config.defenses)
    if workdir:
        _figure(summary, rows, config, workdir)
        _write_table(summary, workdir)
    cl = summary["full"][config.claim_defense]
    agree = bool(cl["hs_vs_none"] < 0 and cl["acc_vs_none"] >= -config.acc_tolerance)
    return {"rows": rows, "summary": summary, "aligned": {**aligned, "accuracy": acc0, **base_info},
            "claim": TH.claim(f"full FT, {config.claim_defense}: mean HS after − none's (7 tasks), at task accuracy "
                              f"within {config.acc_tolerance} of none's (Δacc = {cl['acc_vs_none']:+.3f})",
                              cl["hs_vs_none"], "< 0", agree),
            "seconds": time.time() - t_start, "log": logs}


def summarize(rows, defenses) -> Dict[str, Dict[str, dict]]:
    """{method: {defence: mean HS after, mean accuracy, their changes against none, time per step ÷ none's}}."""
    out = {}
    for m in METHODS:
        out[m] = {}
        for n in defenses:
            rr = [r for r in rows if r["method"] == m and r["defense"] == n]
            if rr:
                out[m][n] = {"hs_after": float(np.mean([r["hs_after"] for r in rr])),
                             "acc_after": float(np.mean([r["acc_after"] for r in rr])),
                             "du": float(np.mean([r["du"] for r in rr])), "step_seconds": rr[0]["step_seconds"]}
        base = out[m].get("none")
        for s in out[m].values():
            s["hs_vs_none"] = s["hs_after"] - base["hs_after"]
            s["acc_vs_none"] = s["acc_after"] - base["acc_after"]
            s["time_ratio"] = s["step_seconds"] / base["step_seconds"]
    return out


def _write_table(summary, workdir):
    if jax.process_index() != 0:
        return
    cols = ("method", "defense", "hs_after", "hs_vs_none", "acc_after", "acc_vs_none", "du", "time_ratio")
    with open(os.path.join(workdir, "defenses_lm.md"), "w") as f:
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for m, d in summary.items():
            for n, s in d.items():
                f.write("| " + " | ".join([m, n] + [f"{s[c]:.4g}" for c in cols[2:]]) + " |\n")


def _figure(summary, rows, config, workdir):
    f, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "osD^vP*X"
    for ax, m in zip(axes, METHODS):
        for i, n in enumerate(config.defenses):
            rr = [r for r in rows if r["method"] == m and r["defense"] == n]
            s = summary[m][n]
            line = ax.scatter([s["acc_after"]], [s["hs_after"]], marker=markers[i % len(markers)], s=70,
                              label=f"{n} (×{s['time_ratio']:.2g} time/step)", zorder=3)
            ax.scatter([r["acc_after"] for r in rr], [r["hs_after"] for r in rr], marker=markers[i % len(markers)],
                       s=14, alpha=0.25, color=line.get_facecolor()[0])
        hs0 = rows[0]["hs_before"]
        ax.axhline(hs0, color="gray", ls=":", lw=1, label=f"θ* (HS {hs0:.2f})")
        ax.set_xlabel("task accuracy after fine-tuning (mean over tasks; faint: per task)")
        ax.set_ylabel("HS after (1–5 rubric)")
        ax.set_title(f"{'full fine-tuning' if m == 'full' else 'LoRA'}: HS vs accuracy (lower right is better)")
        ax.legend(fontsize=7)
    f.tight_layout()
    harness.save_figure(f, workdir, "defenses_lm")
