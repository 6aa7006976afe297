"""Defences on the Section-7 model: HS after fine-tuning vs task accuracy for no defence and each defence of the
registry (dynamics.defenses), over the seven benign tasks, full fine-tuning and LoRA; the Pareto figure; the time
per step relative to plain fine-tuning.

The base model θ* is the lm_table1 study's (the same base fields: reused from ../lm_table1/base_model when the
main job ran it first, else trained here the same way).
Run (default; float32, 2 methods × 6 defences × 7 tasks; ≈ 2–5 min on 2 CPU cores with lm_table1's θ* reused,
124–316 s measured in the main job (quiet vs shared machine); training θ* here adds lm_table1's base stage):
    python -m experiments.run --config=configs/defenses_lm.py --workdir=runs/defenses_lm
Smoke (used by the tests): --config=configs/defenses_lm.py:smoke
Fields: the base model's (as configs/lm_table1.py: architecture, width, layers, heads, kv_heads, intermediate,
context, init_std, remat, n_pretrain, n_align, batch_size, lr_*, epochs_*), defenses (registry names, none first),
tasks, n_ft (examples per task; alpaca_top100 takes the n_ft pool examples closest to harmful compliance), n_pool,
n_eval, n_safety, n_coupling (fine-tuning examples in the Problem's batch: coupling suppression's H(θ*)), d (the
sensitive subspace), lanczos_iters, batch_size_ft, lr_full, epochs_full, lr_lora, epochs_lora, lora_rank,
lora_alpha, lora_targets, optimizer, every / refresh_iters (dynamic projection: refresh period in steps, Lanczos
steps of a warm refresh), fisher_strength, utility_strength (λ_reg), claim_defense, acc_tolerance (the claim: HS change
at equal task accuracy, within acc_tolerance).
"""
import ml_collections

from configs import common

PRESETS = {
    "smoke": dict(width=32, layers=1, heads=2, kv_heads=2, intermediate=64, n_pretrain=300, n_align=100,
                  epochs_pretrain=8, epochs_align=3, lr_pretrain=1e-2, lr_align=3e-3, n_ft=16, n_pool=32, n_eval=16,
                  n_safety=8, n_coupling=8, d=2, lanczos_iters=12, refresh_iters=6, every=2, epochs_full=1,
                  epochs_lora=1, batch_size_ft=8, tasks=("alpaca_top100",),
                  defenses=("none", "static_projection", "fisher_penalty")),
    "default": dict(),
    "full": dict(width=128, layers=4, heads=8, kv_heads=4, intermediate=352, n_pretrain=8000, n_align=800,
                 n_ft=512, n_pool=4000, n_eval=512, n_safety=100, d=32, lanczos_iters=96, refresh_iters=32),
}
PRESETS["large"] = PRESETS["full"]


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "defenses_lm"
    c.preset = "default"
    c.seed = 0
    c.dtype = "float32"
    # base model: the fields of configs/lm_table1.py (the same values share one θ*)
    c.architecture = "LlamaForCausalLM"
    c.width, c.layers, c.heads, c.kv_heads, c.intermediate, c.context = 64, 2, 4, 4, 160, 24
    c.init_std, c.remat = 0.02, "none"
    c.n_pretrain, c.n_align, c.batch_size = 2000, 200, 64
    c.lr_pretrain, c.epochs_pretrain, c.lr_align, c.epochs_align = 3e-3, 4, 1e-3, 1
    # fine-tuning
    c.defenses = ("none", "static_projection", "dynamic_projection", "fisher_penalty", "utility_penalty",
                  "coupling_suppression")
    c.tasks = ("gsm8k", "orca_math", "samsum", "alpaca", "dolly", "wikitext", "alpaca_top100")
    c.n_ft, c.n_pool, c.n_eval, c.n_safety, c.n_coupling = 128, 1000, 128, 100, 32
    c.batch_size_ft, c.optimizer = 16, "adam"   # optimizer: adam | sgd, after the defence
    c.lr_full, c.epochs_full = 3e-3, 4
    c.lr_lora, c.epochs_lora = 3e-3, 6
    c.lora_rank, c.lora_alpha = 8, 16.0
    c.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    # defences
    c.d, c.lanczos_iters = 16, 48
    c.every, c.refresh_iters = 8, 24
    c.fisher_strength, c.utility_strength = 10.0, 10.0
    c.claim_defense, c.acc_tolerance = "fisher_penalty", 0.05
    return common.apply_config_arg(c, arg, PRESETS)
