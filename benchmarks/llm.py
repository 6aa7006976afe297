"""The Llama family against transformers/torch on this CPU, and the memory table at the paper's scale.

Run: ``python -m benchmarks.llm [--quick] [--json PATH] [--memory-table]``.

* **Forward + backward**: a ~28M-parameter Llama (vocab 8192, hidden 512, 8 layers, 8 query / 4 key-value heads
  of 64, MLP 1408, tied embedding, llama3 RoPE scaling) in float32, next-token loss on 4 × 128 tokens.
  ``models.forward`` under ``jax.value_and_grad`` (jitted, remat "full" and "none") against
  ``LlamaForCausalLM`` (sdpa attention) ``loss.backward()`` on the same weights (written by
  ``models.save_pretrained``, read by ``from_pretrained``). Ratio = tokens/s of JAX ÷ tokens/s of torch.
* **HVP**: ``curvature.hvp`` (forward-over-reverse, jitted) against torch's double backward
  (g = ∇L with create_graph=True, then ∇(g·v); eager attention, whose backward is twice differentiable) on the
  same model, batch and vector. Ratio = torch time ÷ JAX time. Agreement: ‖Hv_jax − Hv_torch‖/‖Hv_torch‖.

Timings: compile first, then alternating per-framework blocks (benchmarks.time_blocks), medians of paired
per-block ratios. ``--memory-table`` prints the Markdown table of what fits for Qwen3-1.7B and Llama-3.2-3B
(``models.memory.estimate_memory``; no device needed).
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile

import numpy as np

from benchmarks import bench_args, median, paired_ratio, time_blocks, write_json

BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4,
             head_dim=64, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=512)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=128)


def _config(quick):
    from alignment_geom import models as M

    return M.LlamaConfig(**(QUICK if quick else BENCH),
                         rope_scaling=M.Llama3RoPE(8.0, 1.0, 4.0, 64 if quick else 256))


def main(argv=None, quick: bool = False, log=print):
    args = bench_args(__doc__, argv, reps=6, extra=[("--memory-table", dict(action="store_true"))])
    quick = quick or args.quick
    if args.memory_table:
        table = memory_table()
        log(table)
        return {"memory_table": table}
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from alignment_geom import curvature
    from alignment_geom import models as M

    cfg = _config(quick)
    B, T = (2, 32) if quick else (4, 128)
    params = M.init_llama(cfg, jax.random.PRNGKey(0), "float32", std=0.05)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = jax.tree_util.tree_map(jnp.asarray, M.make_batch([[int(t[0])] for t in tok], [list(t[1:]) for t in tok]))
    n = M.llama.param_count(params)
    log(f"llm: {n / 1e6:.1f}M parameters, batch {B} x {T} tokens, float32")
    with tempfile.TemporaryDirectory() as d:
        M.save_pretrained(cfg, params, d)
        tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
        te = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    labels = ids.clone()
    labels[:, 0] = -100

    def t_fwd_bwd():
        tm.zero_grad(set_to_none=True)
        loss = tm(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss

    names = M.hf.hf_names(cfg)
    tparams = dict(te.named_parameters())
    order = [tparams[names[k]] for k in ("embed", "norm")] + [tparams[x] for per in names["layers"].values()
                                                              for x in per]
    rng = np.random.default_rng(1)
    v = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    tv = [torch.tensor(np.asarray(v[k])) for k in ("embed", "norm")] + [
        torch.tensor(np.asarray(v["layers"][k][i])) for k in names["layers"] for i in range(cfg.num_layers)]

    def t_hvp():
        loss = te(input_ids=ids, labels=labels).loss
        g = torch.autograd.grad(loss, order, create_graph=True)
        return torch.autograd.grad(g, order, grad_outputs=tv)

    out = {"config": dataclasses.asdict(cfg) | {"rope_scaling": dataclasses.asdict(cfg.rope_scaling)},
           "n_params": n, "batch": B, "seq_len": T, "torch_threads": torch.get_num_threads()}
    jfns = {}
    for remat in ("full", "none"):
        c = dataclasses.replace(cfg, remat=remat)
        loss = M.LMFunction(c, "sft_loss")
        jfns[f"jax_fwd_bwd_{remat}"] = (jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile(),
                                        (params, batch))
    loss = M.LMFunction(cfg, "sft_loss")
    jh = jax.jit(lambda p, v, b: curvature.hvp(loss, p, v, b)).lower(params, v, batch).compile()
    jfns["jax_hvp"] = (jh, (params, v, batch))
    # agreement first (one call each)
    hv = jh(params, v, batch)
    th = t_hvp()
    flat_j = np.concatenate([np.asarray(hv[k]).ravel() for k in ("embed", "norm")] + [
        np.asarray(hv["layers"][k][i]).ravel() for k in names["layers"] for i in range(cfg.num_layers)])
    flat_t = np.concatenate([x.detach().numpy().ravel() for x in th])
    out["hvp_rel_diff"] = float(np.linalg.norm(flat_j - flat_t) / np.linalg.norm(flat_t))
    lj = float(jfns["jax_fwd_bwd_full"][0](params, batch)[0])
    out["loss_rel_diff"] = abs(lj - t_fwd_bwd().item()) / abs(lj)
    times, per_block = time_blocks({"jax": jfns, "torch": {"torch_fwd_bwd": (t_fwd_bwd, ()), "torch_hvp": (t_hvp, ())}},
                                   blocks=2 if quick else max(2, args.reps // 2), reps=2 if quick else 4,
                                   pause=0.05 if quick else 0.3)
    med = {k: median(t) for k, t in times.items()}
    toks = B * T
    out["median_s"] = med
    out["tokens_per_s"] = {k: toks / s for k, s in med.items() if "fwd_bwd" in k}
    out["fwd_bwd_speedup_full"] = paired_ratio(per_block, "torch_fwd_bwd", "jax_fwd_bwd_full")
    out["fwd_bwd_speedup_none"] = paired_ratio(per_block, "torch_fwd_bwd", "jax_fwd_bwd_none")
    out["hvp_speedup"] = paired_ratio(per_block, "torch_hvp", "jax_hvp")
    out["jax_hvp_over_fwd_bwd"] = paired_ratio(per_block, "jax_hvp", "jax_fwd_bwd_full")
    out["torch_hvp_over_fwd_bwd"] = paired_ratio(per_block, "torch_hvp", "torch_fwd_bwd")
    tps = out["tokens_per_s"]
    log(f"  forward+backward tokens/s: jax (remat full) {tps['jax_fwd_bwd_full']:.0f}, "
        f"jax (remat none) {tps['jax_fwd_bwd_none']:.0f}, torch {tps['torch_fwd_bwd']:.0f}"
        f" -> jax/torch {out['fwd_bwd_speedup_full']:.2f} (full), {out['fwd_bwd_speedup_none']:.2f} (none)")
    log(f"  HVP: torch double backward / jax hvp = {out['hvp_speedup']:.2f} (rel. diff {out['hvp_rel_diff']:.1e})")
    write_json(args.json, out)
    return out


# --------------------------------------------------------------------------- memory table

GPU = ("1 GPU, 141 GB", 141e9, 1)
TPU = ("8 chips x 16 GB (FSDP over 8)", 16e9, 8)
USABLE = 0.9  # of the nominal memory (the runtime and XLA keep some)
WORKLOAD = dict(batch=8, seq_len=1024, completion_len=512)


def _settings(lora):
    """(label, estimate kwargs, cfg overrides) in order of preference (least recomputation first)."""
    base = dict(WORKLOAD, lora=lora)
    return [("remat none", base, {"remat": "none"}),
            ("remat dots", base, {"remat": "dots"}),
            ("remat full", base, {"remat": "full"}),
            ("remat full, logit chunk 128", dict(base, logit_chunk=128), {"remat": "full"}),
            ("remat full, logit chunk 128, batch 1", dict(base, logit_chunk=128, batch=1), {"remat": "full"})]


def memory_table() -> str:
    """The Markdown table of what fits (module docstring of alignment_geom.models.memory)."""
    from alignment_geom import models as M
    from alignment_geom.models import memory

    lora = M.LoRAConfig(rank=16, alpha=32.0, targets=M.LLAMA_LORA_TARGETS)
    tasks = [("full FT, Adam", "adam", None, {}), ("LoRA r=16 (all 7), Adam", "adam", lora, {}),
             ("HVP", "hvp", None, {}), ("third order", "third_order", None, {}),
             ("Lanczos, 20 vectors (F v, f32 basis)", "lanczos", None, {"basis_vectors": 20}),
             ("Lanczos, 20 vectors (F v, bf16 basis)", "lanczos", None, {"basis_vectors": 20,
                                                                        "basis_dtype": "bfloat16"}),
             ("Lanczos, 100 vectors (F v, bf16 basis)", "lanczos", None, {"basis_vectors": 100,
                                                                         "basis_dtype": "bfloat16"}),
             ("Lanczos, 20 vectors, LoRA (F v, f32 basis)", "lanczos", lora, {"basis_vectors": 20})]
    lines = [f"Workload: batch {WORKLOAD['batch']} x {WORKLOAD['seq_len']} tokens ({WORKLOAD['completion_len']} "
             f"completion positions), bfloat16 parameters, usable memory {USABLE:.0%} of nominal. "
             "Each cell: the first setting that fits (least recomputation first) and its peak per device.", "",
             "| model | task | " + " | ".join(h for h, _, _ in (GPU, TPU)) + " |",
             "|---|---|" + "---|" * 2]
    for mname, d in memory.PUBLISHED_CONFIGS.items():
        cfg = M.hf.config_from_hf(d)
        for tname, op, lc, extra in tasks:
            cells = []
            for _, cap, ndev in (GPU, TPU):
                best = None
                for label, kw, over in _settings(lc):
                    c = dataclasses.replace(cfg, **over)
                    est = memory.estimate_memory(c, op, dtype="bfloat16", devices=ndev, **{**kw, **extra})
                    if best is None or est.peak < best[1].peak:
                        best = (label, est)
                    if est.peak <= USABLE * cap:
                        best = (label, est)
                        break
                ok = best[1].peak <= USABLE * cap
                cells.append(f"{'yes' if ok else 'no'}: {best[0]}, {best[1].peak / 1e9:.1f} GB")
            lines.append(f"| {mname.split('/')[-1]} | {tname} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
