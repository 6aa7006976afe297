"""Figures 10–11 and the Table-1 analogue: a tiny Llama-family LM (models.llama) trained here on a synthetic instruction
language, aligned to refuse harmful requests, fine-tuned on benign tasks (full FT 1 epoch, LoRA 3 epochs).

Run (default; float32 training, float64 curvature; ≈ 2–4 min on 2 CPU cores, 125 s measured in the main job):
    python -m experiments.run --config=configs/lm_table1.py --workdir=runs/lm_table1
Smoke scale (≲ 1 min, used by the tests):  --config=configs/lm_table1.py:smoke
GPU/TPU scale:                             --config=configs/lm_table1.py:full   (alias: large)
Writes results.json (table, correlation, spectra, intruders, aic), table1.md, table1.csv and the figures
fig10_fisher_spectrum, fig11_table1 and lm_table1 (both), each PNG + PDF.
Fields: model (architecture, width = hidden size, layers, heads, kv_heads, intermediate = SwiGLU width, context,
init_std, remat), data sizes (n_pretrain/n_align per task, n_ft, n_eval,
n_safety = the safe completions of the Fisher, n_pool/n_top for alpaca_top100), optimisation (lr_*, epochs_*,
batch sizes, LoRA rank/alpha/targets), the Fisher (d = subspace dim, d_exact Lanczos pairs, k_subspace = the
paper's random-subspace dim of the empirical Fisher, k_list for the convergence check, subspace_chunk = examples
per vmapped chunk of it), AIC (n_aic batch, gd_lr = η, gd_steps, gd_points,
aic_energy_min, aic_orth_max), intruder dimensions (top_k, threshold).
"""
import ml_collections

from configs import common

PRESETS = {
    "smoke": dict(width=32, layers=1, heads=2, kv_heads=2, intermediate=64, n_pretrain=300, n_align=100,
                  epochs_pretrain=8, epochs_align=3, lr_pretrain=1e-2, lr_align=3e-3, n_ft=16, n_eval=16, n_safety=8,
                  d=2, d_exact=4,
                  lanczos_iters=24, k_subspace=64, k_list=(16,), n_aic=8, gd_steps=8, gd_points=4,
                  n_pool=32, n_top=16, taylor_order=4, tasks=("samsum", "alpaca_top100"), subspace_chunk=8,
                  du_points=2, intruder_top_k=4),
    "default": dict(),
    "full": dict(width=128, layers=4, heads=8, kv_heads=4, intermediate=352,
                 n_pretrain=8000, n_align=800, n_ft=4000, n_eval=512, n_safety=100,
                 d=32, d_exact=128, k_subspace=4096, k_list=(256, 1024), n_aic=512, gd_steps=400, n_pool=4000,
                 n_top=100),
}
PRESETS["large"] = PRESETS["full"]


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "lm_table1"
    c.preset = "default"
    c.seed = 0
    c.dtype = "float32"        # model training / generation
    c.aic_dtype = "float64"    # Fisher, OS, AIC, Taylor coefficients
    # model: a tiny member of the Llama-3 / Qwen3 family (models.llama), ≈ 100k parameters
    c.architecture = "LlamaForCausalLM"   # or "Qwen3ForCausalLM" (per-head RMSNorm of q and k)
    c.width, c.layers, c.heads, c.kv_heads, c.intermediate, c.context = 64, 2, 4, 4, 160, 24
    c.init_std = 0.02          # θ₀ ~ N(0, init_std²) (the reference initializer_range)
    c.remat = "none"           # a tiny model: no rematerialisation
    # data (per task)
    c.n_pretrain, c.n_align = 2000, 200
    c.n_ft, c.n_eval, c.n_safety = 1000, 128, 100
    c.n_pool, c.n_top = 1000, 100
    c.tasks = ("gsm8k", "orca_math", "samsum", "alpaca", "dolly", "wikitext", "alpaca_top100")
    # optimisation
    c.batch_size, c.batch_size_ft = 64, 16
    c.lr_pretrain, c.epochs_pretrain = 3e-3, 4
    c.lr_align, c.epochs_align = 1e-3, 1
    c.lr_full, c.lr_lora, c.epochs_lora = 3e-3, 3e-3, 3
    c.lora_rank, c.lora_alpha = 8, 16.0
    c.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.du_points = 16
    # Fisher of the safety skill
    c.d, c.d_exact = 16, 32
    c.lanczos_iters, c.lanczos_tol = 0, 0.0  # 0: spectral.top_eigenpairs' default steps / no early stop
    c.k_subspace, c.k_list, c.subspace_chunk = 1024, (128, 256), 128   # the paper's k = 4096: the :full preset
    # AIC / onset
    c.n_aic, c.gd_lr, c.gd_steps, c.gd_points = 64, 1e-2, 100, 40  # Δu recorded at gd_points log-spaced steps
    c.taylor_order = 4         # a_0..a_4 by curvature.utility_taylor (0 = skip: its compile is the slowest step)
    c.taylor_method = "jet"    # Taylor mode over the jaxpr ("jvp": nested jvps, 2^k passes)
    c.aic_energy_min, c.aic_orth_max = 0.9, 0.1
    c.onset_task = "alpaca_top100"
    # LoRA intruder dimensions
    c.intruder_top_k, c.intruder_threshold = 10, 0.5
    return common.apply_config_arg(c, arg, PRESETS)
