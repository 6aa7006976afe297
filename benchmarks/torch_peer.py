"""The PyTorch peer: the same models and data in PyTorch (CPU), against alignment_geom.

Two comparisons, both on the exact weights and data of benchmarks/models.py (the MLP's torch mirror is written
by hand here; the transformer's is transformers' ``LlamaForCausalLM`` loaded from ``models.save_pretrained``):

* **HVP**: the reverse-over-reverse Hessian-vector product that PyHessian and alignment-risk compute
  (g = ∇L with ``create_graph=True``, then H v = ∇(g·v): one forward, a backward that records its own
  graph, and a backward through that graph), against ``alignment_geom.curvature.hvp`` jitted
  (forward-over-reverse). Wall times interleaved, float32 (both sides); ratio = t_torch / t_jax.
  Agreement: ‖Hv_torch − Hv_jax‖ / ‖Hv_jax‖ in float64 (both sides; transformers' RMSNorm and softmax run in
  float32 even for float64 weights, so the transformer agrees to ~1e-7 there). The plain gradient is timed
  alongside (the transformer's in tokens/s, torch with sdpa attention).
* **ε̂ / γ̂ pipeline**: alignment-risk's ``FisherSubspaceAnalyzer`` (per-sample gradients of the
  safety loss, SVD of the m × n gradient matrix: the empirical Fisher F̂ = GᵀG/m, top-d) and
  ``CurvatureCouplingAnalyzer`` (g and H g by double backward; ε̂ = ‖F̂^{1/2} P g‖, γ̂ = ‖F̂^{1/2} P H g‖)
  against ``alignment_geom.aic.measure(..., fisher="empirical")`` with the same d and samples, with its
  default eigensolver (Lanczos on the F̂ matvec, tol 1e-10) and with ``method="gram"`` (exact, from the
  m×m Gram matrix: alignment-risk's computation). aic.measure also computes tr F̂ (exact), the tail and
  c₃, which alignment-risk does not. Float64 on both
  sides, so the agreement (eigenvalues, ε̂ = eps_F, γ̂ = gamma_F) is checked to 1e-5 relative.

torch comes with requirements-test.txt (`make benchmarks` installs it); without it the section reports
``skipped`` with the reason.
Run alone: ``python -m benchmarks.torch_peer [--quick] [--json PATH]``.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from alignment_geom.tree import tree_dot
from benchmarks import bench_args, compile_fn, median, paired_ratio, time_blocks, write_json
from benchmarks.curvature import _flops

AGREE_TOL = 1e-5
TARGET_SPEEDUP = 5.0


def torch_available():
    """(True, version) or (False, reason)."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - depends on the environment
        return False, f"torch not importable ({type(e).__name__}: {e}); pip install -r requirements-test.txt"
    return True, torch.__version__


def alignment_risk_available():
    try:
        import alignment_risk
    except Exception as e:
        return False, f"alignment-risk not importable ({type(e).__name__}: {e})"
    return True, alignment_risk.__version__


# --------------------------------------------------------------------------- torch mirrors of the models


def _t(x, dtype):
    import torch

    return torch.tensor(np.asarray(x), dtype=dtype)


def build_torch_module(model, dtype_name="float32", attn_implementation="eager"):
    """The PyTorch peer of ``model`` (a benchmarks.models Problem) on the same weights: ``module.loss(batch)`` = L,
    ``module.parameters()`` / ``named_parameters()``, and ``module.jax_index`` {torch name: (jax leaf index,
    layer or None)} (jax.tree_util leaf order; a stacked (L, ...) leaf is L torch tensors).

    mlp: a hand-written mirror (``module.logprob(batch)`` = per-example log π(y|x) too). transformer:
    transformers' ``LlamaForCausalLM`` loaded from the checkpoint ``models.save_pretrained`` writes, with
    ``attn_implementation`` ("eager": its backward is twice differentiable; "sdpa": the fast one)."""
    import torch
    import torch.nn.functional as Fn

    dtype = getattr(torch, dtype_name)
    params = model.params

    if model.name == "mlp":
        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.n = len(params)
                for i in range(self.n):
                    self.register_parameter(f"W{i}", torch.nn.Parameter(_t(params[f"l{i}"]["W"], dtype)))
                    self.register_parameter(f"b{i}", torch.nn.Parameter(_t(params[f"l{i}"]["b"], dtype)))
                self.jax_index = {f"{k}{i}": (2 * i + j, None) for i in range(self.n) for j, k in enumerate("Wb")}

            def forward(self, x):
                h = x
                for i in range(self.n):
                    h = h @ getattr(self, f"W{i}") + getattr(self, f"b{i}")
                    if i < self.n - 1:
                        h = torch.tanh(h)
                return h

            def logprob(self, batch):
                lp = Fn.log_softmax(self(batch["x"]), dim=-1)
                return lp.gather(-1, batch["y"][:, None])[:, 0]

            def loss(self, batch):
                return -self.logprob(batch).mean()

        return MLP()
    if model.name == "transformer":
        return HFPeer(model, dtype_name, attn_implementation)
    raise ValueError(f"no torch peer for model {model.name!r}")


class HFPeer:
    """transformers' LlamaForCausalLM on the weights of a transformer Problem (written by models.save_pretrained,
    read by from_pretrained). ``loss(batch)`` is transformers' own next-token loss with labels = the completion
    targets at ``pos + 1`` (−100 elsewhere): the same L as ``models.sft_loss``."""

    def __init__(self, model, dtype_name="float32", attn_implementation="eager"):
        import tempfile

        import jax
        import torch
        import transformers

        from alignment_geom import models as M
        from benchmarks.models import llama_config

        cfg = llama_config(model)
        with tempfile.TemporaryDirectory() as d:
            M.save_pretrained(cfg, model.params, d)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=getattr(torch, dtype_name), attn_implementation=attn_implementation)
        self.model.train(False)
        names = M.hf.hf_names(cfg)
        self.jax_index = {}
        for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(model.params)[0]):
            keys = [getattr(k, "key", k) for k in path]
            if keys[0] == "layers":
                for layer, n in enumerate(names["layers"][keys[1]]):
                    self.jax_index[n] = (i, layer)
            else:
                self.jax_index[names[keys[0]]] = (i, None)
        own = [n for n, _ in self.model.named_parameters()]
        if sorted(own) != sorted(self.jax_index):
            raise ValueError(f"parameter names differ: {sorted(set(own) ^ set(self.jax_index))}")

    def parameters(self):
        return self.model.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def loss(self, batch):
        import torch

        tok, mask = batch["tokens"], batch["attention_mask"]
        labels = torch.full_like(tok, -100)
        rows = torch.arange(tok.shape[0])[:, None].expand_as(batch["pos"])
        real = batch["weights"] > 0
        labels[rows[real], batch["pos"][real] + 1] = batch["targets"][real]
        kw = {}
        if not bool(mask.all()):
            kw = dict(attention_mask=mask, position_ids=torch.clamp(torch.cumsum(mask, 1) - 1, min=0))
        return self.model(input_ids=tok, labels=labels, **kw).loss


def torch_leaves(module, leaves, dtype):
    """jax leaves (numpy, jax.tree_util order) → torch tensors in ``module.parameters()`` order."""
    out = []
    for n, _ in module.named_parameters():
        i, layer = module.jax_index[n]
        x = np.asarray(leaves[i]) if layer is None else np.asarray(leaves[i])[layer]
        out.append(_t(x, dtype))
    return out


def jax_flat(module, tensors):
    """torch tensors in ``module.parameters()`` order → one float64 vector in jax.tree_util leaf order."""
    parts = {}
    for (n, _), t in zip(module.named_parameters(), tensors):
        i, layer = module.jax_index[n]
        parts[(i, -1 if layer is None else layer)] = t.detach().double().numpy().ravel()
    return np.concatenate([parts[k] for k in sorted(parts)])


def torch_batch(model):
    import torch

    return {k: torch.from_numpy(np.array(v)).long() if np.issubdtype(np.asarray(v).dtype, np.integer)
            else torch.from_numpy(np.array(v)) for k, v in model.batch.items()}


def _batch_dtype(batch, dtype):
    import torch

    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in batch.items()}


def torch_hvp(module, batch, vs):
    """PyHessian's HVP: g = ∇L (create_graph=True), H v = ∂(g)/∂θ · v via a second backward."""
    import torch

    params = list(module.parameters())
    loss = module.loss(batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=vs)


def _jax_leaves_to_torch(leaves, dtype):
    return [_t(x, dtype) for x in leaves]


# --------------------------------------------------------------------------- HVP timing + agreement


def gemm_peak_flops(quick: bool = False, n: int = 2048):
    """This machine's dense float32 matmul throughput (flop/s): the best of JAX's and torch's n×n×n
    GEMM (block-timed). The ceiling for any HVP of these GEMM-dominated models."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 256 if quick else n
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, a).compile()
    ta = torch.randn(n, n, dtype=torch.float32)
    times, _ = time_blocks({"jax": {"jax_gemm": (mm, (a, a))}, "torch": {"torch_gemm": (torch.matmul, (ta, ta))}},
                           blocks=2, reps=2 if quick else 5, pause=0.05 if quick else 0.3)
    rates = {k: 2.0 * n ** 3 / min(t) for k, t in times.items()}
    return {"n": n, "flop_per_s": rates, "peak_flop_per_s": max(rates.values())}


def _roofline(flops, med, quick=False):
    """How far each framework's HVP is from this machine's GEMM peak, and what that allows: the
    fastest possible HVP does the fewest flops of the exact formulations (XLA's count of forward-over-
    reverse and reverse-over-reverse) at peak, so torch's HVP time ÷ that is the largest speedup any
    implementation could show over torch on this machine."""
    if not flops.get("hvp"):
        return None
    peak = gemm_peak_flops(quick=quick)
    fmin = min(f for f in (flops["hvp"], flops.get("hvp_rev_rev")) if f)
    t_floor = fmin / peak["peak_flop_per_s"]
    return {
        "gemm": peak, "hvp_min_flops": fmin, "hvp_time_at_peak_s": t_floor,
        "jax_hvp_fraction_of_peak": t_floor / med["jax_hvp"],
        "torch_hvp_fraction_of_peak": t_floor / med["torch_hvp"],
        "jax_grad_fraction_of_peak": flops["grad"] / peak["peak_flop_per_s"] / med["jax_grad"],
        "max_attainable_speedup_over_torch": med["torch_hvp"] / t_floor,
    }


def bench_hvp(model_name: str, quick: bool = False, reps: int = 10, log=print):
    """HVP and gradient of one benchmark model, JAX against its torch peer: agreement in float32 and float64,
    times in float32 (alternating per-framework blocks). The transformer's torch gradient runs with sdpa
    attention (its fastest), its double-backward HVP with eager attention."""
    import jax
    import jax.numpy as jnp
    import torch

    from alignment_geom import curvature as C
    from benchmarks.models import get_model

    out = {"model": model_name}
    for dt_name in ("float32", "float64"):
        jdt = getattr(jnp, dt_name)
        tdt = getattr(torch, dt_name)
        model = get_model(model_name, quick=quick, dtype=jdt)
        module = build_torch_module(model, dt_name)
        tb = _batch_dtype(torch_batch(model), tdt)
        leaves, treedef = jax.tree_util.tree_flatten(model.params)
        rng = np.random.default_rng(3)
        v_np = [rng.standard_normal(x.shape) for x in leaves]
        v = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, jdt) for x in v_np])
        vs = torch_leaves(module, v_np, tdt)
        fj, tcomp = compile_fn(lambda p, w, b: C.hvp(model.loss_fn, p, w, b), model.params, v, model.batch)
        hv_j = fj(model.params, v, model.batch)
        hv_t = torch_hvp(module, tb, vs)
        hj = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(hv_j)])
        ht = jax_flat(module, hv_t)
        rel = float(np.linalg.norm(hj - ht) / np.linalg.norm(hj))
        lj = float(model.loss_fn(model.params, model.batch))
        loss_rel = abs(lj - float(module.loss(tb).detach())) / abs(lj)
        out[f"hvp_rel_diff_{dt_name}"] = rel
        out[f"loss_rel_diff_{dt_name}"] = loss_rel
        if dt_name == "float32":
            gj, _ = compile_fn(lambda p, b: jax.value_and_grad(model.loss_fn)(p, b), model.params, model.batch)
            gmod = module if model_name == "mlp" else build_torch_module(model, dt_name, "sdpa")
            gparams = list(gmod.parameters())

            def t_grad():
                loss = gmod.loss(tb)
                return loss, torch.autograd.grad(loss, gparams)

            rev_rev = jax.jit(lambda p, w, b: jax.grad(
                lambda q: tree_dot(jax.grad(model.loss_fn)(q, b), w))(p))
            flops = {"grad": _flops(gj), "hvp": _flops(fj),
                     "hvp_rev_rev": _flops(rev_rev.lower(model.params, v, model.batch).compile())}
            times, per_block = time_blocks({
                "jax": {"jax_grad": (gj, (model.params, model.batch)), "jax_hvp": (fj, (model.params, v, model.batch))},
                "torch": {"torch_grad": (t_grad, ()), "torch_hvp": (lambda: torch_hvp(module, tb, vs), ())},
            }, blocks=2 if quick else max(2, reps // 2), reps=2 if quick else 5, pause=0.05 if quick else 0.3)
            med = {k: median(t) for k, t in times.items()}
            out.update({
                "timing": "alternating per-framework blocks (benchmarks.time_blocks)",
                "calls_per_function": len(times["jax_hvp"]), "blocks": len(per_block["jax_hvp"]),
                "torch_threads": torch.get_num_threads(),
                "median_s": med,
                "speedup_hvp": paired_ratio(per_block, "torch_hvp", "jax_hvp"),
                "speedup_grad": paired_ratio(per_block, "torch_grad", "jax_grad"),
                "torch_hvp_over_torch_grad": paired_ratio(per_block, "torch_hvp", "torch_grad"),
                "jax_hvp_over_jax_grad": paired_ratio(per_block, "jax_hvp", "jax_grad"),
                "jax_compile_s": tcomp,
                "xla_flops": flops,
            })
            if model_name == "transformer":
                ntok = int(np.asarray(model.batch["weights"]).sum())
                out["tokens"] = ntok
                out["tokens_per_s"] = {"jax_grad": ntok / med["jax_grad"], "torch_grad": ntok / med["torch_grad"]}
            out["roofline"] = _roofline(flops, med, quick=quick)
    out["agree"] = bool(out["hvp_rel_diff_float64"] <= AGREE_TOL)
    out["pass"] = bool(out["speedup_hvp"] >= TARGET_SPEEDUP)
    log(f"[torch] {model_name}: HVP torch/jax = {out['speedup_hvp']:.2f}x (target >= {TARGET_SPEEDUP}), "
        f"grad torch/jax = {out['speedup_grad']:.2f}x, torch HVP = {out['torch_hvp_over_torch_grad']:.2f} torch grads, "
        f"|dHv|/|Hv| f64 = {out['hvp_rel_diff_float64']:.1e}, f32 = {out['hvp_rel_diff_float32']:.1e}")
    rf = out.get("roofline")
    if rf:
        log(f"[torch] {model_name}: GEMM peak {rf['gemm']['peak_flop_per_s'] / 1e9:.0f} GFLOP/s; HVP at "
            f"{100 * rf['jax_hvp_fraction_of_peak']:.0f}% of it in JAX, {100 * rf['torch_hvp_fraction_of_peak']:.0f}% "
            f"in torch -> at most {rf['max_attainable_speedup_over_torch']:.2f}x over torch is possible here")
    return out


# --------------------------------------------------------------------------- ε̂ / γ̂ pipeline


def bench_aic(quick: bool = False, d: int = 8, m: int = 64, log=print):
    """alignment-risk's Fisher + curvature analyzers against aic.measure(fisher="empirical"), float64."""
    import jax.numpy as jnp
    import torch

    from alignment_geom import aic
    from benchmarks.models import get_model, n_params

    ok, why = alignment_risk_available()
    if not ok:
        return {"skipped": why}
    from alignment_risk import CurvatureConfig, CurvatureCouplingAnalyzer, FisherConfig, FisherSubspaceAnalyzer

    if quick:
        d, m = 3, 8
    model = get_model("mlp", quick=quick, dtype=jnp.float64)
    n = n_params(model.params)
    safety = {k: v[:m] for k, v in model.batch.items()}  # m safety samples (x, y = the safe completion)
    module = build_torch_module(model, "float64")
    tb = _batch_dtype(torch_batch(model), torch.float64)
    tsafety = {k: v[:m] for k, v in tb.items()}

    def safety_loss(mod, sample):  # per-sample −log π(y|x): its gradient is −∇log π (sign-free for F̂)
        return -mod.logprob(sample)

    def ft_loss(mod, batch):
        return mod.loss(batch)

    # ---- alignment-risk (torch)
    t0 = time.perf_counter()
    fcfg = FisherConfig(top_rank=d, target_explained_variance=None, max_samples=m, max_parameters=max(n, 1),
                        device="cpu", gradient_collection="loop", subspace_method="svd")
    sub = FisherSubspaceAnalyzer(fcfg).analyze(module, [tsafety], safety_loss)
    t_fisher = time.perf_counter() - t0
    cur = CurvatureCouplingAnalyzer(CurvatureConfig(device="cpu")).analyze(module, [tb], ft_loss, sub)
    t_ar = time.perf_counter() - t0

    # ---- alignment_geom (jax): the default eigensolver (Lanczos on the F̂ matvec) and method="gram" (exact,
    # from the m×m Gram matrix of the per-example gradients: the same computation as alignment-risk's SVD)
    def run_measure(method):
        return aic.measure(model.loss_fn, model.params, model.batch, None, None, d, fisher="empirical",
                           logprob_fn=model.logprob_fn, safety_batch=safety, tol=1e-10, method=method)

    ev_ar = np.asarray(sub.fisher_eigenvalues, np.float64)
    out = {"model": model.name, "n_params": n, "d": d, "m_safety": m, "dtype": "float64",
           "alignment_risk_s": t_ar, "alignment_risk_fisher_s": t_fisher, "eigvals_alignment_risk": ev_ar.tolist(),
           "eps_hat": cur.epsilon_hat, "gamma_hat": cur.gamma_hat}
    worst = 0.0
    for method, sfx in (("lanczos", ""), ("gram", "_gram")):
        t0 = time.perf_counter()
        rep = run_measure(method)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = run_measure(method)
        t_second = time.perf_counter() - t0
        ev_j = np.asarray(rep.eigvals, np.float64)
        ev_rel = float(np.max(np.abs(ev_ar - ev_j) / np.abs(ev_ar)))
        eps_rel = abs(cur.epsilon_hat - rep.eps_F) / abs(cur.epsilon_hat)
        gam_rel = abs(cur.gamma_hat - rep.gamma_F) / abs(cur.gamma_hat)
        worst = max(worst, ev_rel, eps_rel, gam_rel)
        out.update({
            f"aic_measure{sfx}_first_s": t_first, f"aic_measure{sfx}_second_s": t_second,
            f"time_ratio{sfx}_first": t_ar / t_first, f"time_ratio{sfx}_second": t_ar / t_second,
            f"eigvals_aic{sfx}": ev_j.tolist(), f"eps_F{sfx}": rep.eps_F, f"gamma_F{sfx}": rep.gamma_F,
            f"eigvals_max_rel_diff{sfx}": ev_rel, f"eps_rel_diff{sfx}": eps_rel, f"gamma_rel_diff{sfx}": gam_rel,
        })
        log(f"[torch] alignment-risk vs aic.measure(method={method!r}) (mlp, d={d}, m={m}, float64): "
            f"alignment-risk {t_ar:.2f}s, aic.measure {t_first:.2f}s first / {t_second:.2f}s second; "
            f"rel diff eigvals {ev_rel:.1e}, eps {eps_rel:.1e}, gamma {gam_rel:.1e}")
    out["max_rel_diff"] = worst
    out["agree"] = bool(worst <= AGREE_TOL)
    return out


def main(argv=None, quick: bool = False, log=print):
    args = bench_args(__doc__, argv, reps=10, extra=[("--models", dict(default="mlp,transformer"))])
    quick = quick or args.quick
    ok, ver = torch_available()
    if not ok:
        log(f"[torch] skipped: {ver}")
        return {"skipped": ver}
    import jax
    import torch

    jax.config.update("jax_enable_x64", True)  # the agreement checks run in float64; timings in float32
    out = {"torch": ver, "torch_threads": torch.get_num_threads()}
    for name in args.models.split(","):
        out[f"hvp_{name}"] = bench_hvp(name, quick=quick, reps=2 if quick else args.reps, log=log)
    try:
        out["aic_vs_alignment_risk"] = bench_aic(quick=quick, log=log)
    except Exception as e:  # report, do not hide, a failure of the optional peer
        out["aic_vs_alignment_risk"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"[torch] aic vs alignment-risk failed: {type(e).__name__}: {e}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
