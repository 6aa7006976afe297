"""Table 1 of the paper on real LLMs: fine-tune an aligned checkpoint (full FT and LoRA) on benign tasks, score
harmfulness on AdvBench before and after, estimate the safety Fisher from safe completions in a random subspace,
and correlate the overlap score OS = ‖PΔθ‖/‖Δθ‖ with ΔHS.

Try it here (a tiny random Qwen3-architecture checkpoint, its tokenizer and tiny data files in every native
schema are written into the workdir first; no torch/transformers needed; ≈ 1 min on 2 CPU cores):
    python -m experiments.run --config=configs/llm_table1.py:tiny --workdir=runs/llm_tiny

The paper (Qwen3-1.7B or Llama-3.2-3B; local Hugging Face model directory and data files; an OpenAI-compatible
judge endpoint):
    python -m experiments.run --config=configs/llm_table1.py:paper \\
      --config.model_path=/models/Qwen3-1.7B --config.data_dir=/data/table1 \\
      --config.judge_url=http://localhost:8000/v1 --config.judge_model=gpt-4o --workdir=runs/table1_qwen3
  on a TPU slice or several GPUs use --config=configs/llm_table1.py:paper,mesh_shape=8 (FSDP over 8 devices:
  parameters, gradients and Adam split along their first divisible axis, the batch along the same axis).
  Peak memory per device from models.memory.estimate_memory (bfloat16 parameters, float32 Adam, batch 8 × 512
  tokens, logits in blocks of 128 positions, remat "full"):
      model         devices  full FT (Adam)  LoRA r=8  Fisher grads (chunk 4, f32)  Lanczos LoRA, 40 vectors
      Qwen3-1.7B    1        27.6 GiB        4.7 GiB   44.2 GiB                     323 GiB (lanczos_d = 0)
      Qwen3-1.7B    8         4.7 GiB        1.5 GiB   12.1 GiB                     41.3 GiB
      Llama-3.2-3B  1        50.4 GiB        8.1 GiB   79.2 GiB                     598 GiB (lanczos_d = 0)
      Llama-3.2-3B  8         8.1 GiB        2.3 GiB   18.5 GiB                     76.1 GiB
  (fisher_dtype=bfloat16 halves the Fisher column; the Lanczos basis holds full-size vectors, so it is off by
  default.) The run logs these estimates up front and stores them in results.json ("memory_gib"). Time: not
  measured on an accelerator yet; the work is 12 fine-tunes (full 1 epoch, LoRA 3 epochs), 13 × 520 AdvBench
  generations of max_new_tokens, 13 × 520 judge calls, m = 100 per-example gradients and m²/chunk jvps.

Fields: model_path / data_dir / safety_file ('' = none: tiny inputs are generated into the workdir, safe
completions are the model's own greedy refusals), tasks (alpaca_top100 = the 100 Alpaca examples whose
gradients align most with harmful compliance, from a pool of n_pool), methods (full, lora), epochs_* / lr_* /
batch_size / seq_len / n_train / n_eval_task, lora_rank / lora_alpha / lora_targets, n_safety (safe
completions of the Fisher), k_subspace (the random-subspace dimension), d (dim of the sensitive subspace M),
gram_exact (also the exact OS through the m×m Gram matrix), lanczos_d (top true-Fisher eigenpairs of the LoRA
block by Lanczos; 0 = skip), n_advbench / max_new_tokens / gen_batch_size, judge_url / judge_model /
judge_timeout, judge_model_path / judge_max_new_tokens (a local model
judge), (neither = offline: the keyword judge mapped to HS = 1 (refusal) or 5), refusal_extra
(refusal phrases added to the keyword list), dtype / fisher_dtype, mesh_shape (FSDP degree), remat, chunk
(examples per chunk of per-example gradients), logit_chunk (positions per block of logits; 0 = all),
n_bootstrap, seed. tiny_* fields shape the generated tiny checkpoint and data.
"""
import ml_collections

from configs import common

PRESETS = {
    "tiny": dict(tasks=("samsum", "alpaca_top100", "dolly", "gsm8k", "orca_math", "wikitext"), n_train=8,
                 n_eval_task=4, n_pool=12, n_top=6, batch_size=4, seq_len=40, epochs_full=1, epochs_lora=2,
                 lr_full=3e-3, lr_lora=1e-2, lora_rank=2, lora_alpha=4.0, n_safety=6, k_subspace=64, d=3,
                 n_advbench=8, max_new_tokens=6, gen_batch_size=8, dtype="float32", fisher_dtype="float64",
                 chunk=4, logit_chunk=0, n_bootstrap=200, refusal_extra=("sorry",), lanczos_d=2),
    "default": dict(),
    "paper": dict(),
}
PRESETS["smoke"] = PRESETS["tiny"]
PRESETS["large"] = PRESETS["paper"]


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "llm_table1"
    c.preset = "paper"
    c.seed = 0
    # inputs
    c.model_path = ""
    c.data_dir = ""
    c.safety_file = ""
    c.tasks = ("samsum", "alpaca_top100", "dolly", "gsm8k", "orca_math", "wikitext")
    c.methods = ("full", "lora")
    # fine-tuning (the paper: full FT 1 epoch, LoRA 3 epochs)
    c.n_train = 0              # examples per task (0 = all)
    c.n_eval_task = 64         # held-out examples per task for the task metric (mean token NLL)
    c.n_pool, c.n_top = 2000, 100
    c.epochs_full, c.epochs_lora = 1, 3
    c.lr_full, c.lr_lora = 1e-5, 1e-4
    c.batch_size, c.seq_len = 8, 512
    c.lora_rank, c.lora_alpha = 8, 16.0
    c.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    # safety Fisher and geometry
    c.n_safety = 100
    c.k_subspace = 4096
    c.d = 16
    c.gram_exact = True
    c.lanczos_d = 0
    # AdvBench and the judge
    c.n_advbench = 520
    c.max_new_tokens = 256
    c.gen_batch_size = 32
    c.judge_url = ""
    c.judge_model = "gpt-4o"
    c.judge_timeout = 60.0
    c.judge_model_path = ""    # a local Llama/Qwen3 judge model directory instead of judge_url
    c.judge_max_new_tokens = 256
    c.refusal_extra = ("",)
    # numerics and layout
    c.dtype = "bfloat16"
    c.fisher_dtype = "float32"
    c.mesh_shape = (1,)
    c.remat = "full"
    c.chunk = 4
    c.logit_chunk = 128
    c.n_bootstrap = 2000
    c.checkpoint_every = 1
    # the generated tiny checkpoint and data (used only when model_path / data_dir are '')
    c.tiny_layers, c.tiny_hidden, c.tiny_vocab = 2, 32, 128
    c.tiny_records, c.tiny_align_steps = 16, 150
    common.apply_config_arg(c, arg, PRESETS)
    return c
