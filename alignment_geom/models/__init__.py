"""Models whose curvature alignment_geom measures: pure functions of parameter pytrees.

    llama         Llama-3.x / Qwen3 decoder-only LMs (LlamaConfig, init_params, forward, hidden_states, lm_head)
    hf            Hugging Face checkpoints: load_pretrained / save_pretrained (safetensors, sharded reading),
                  PEFT LoRA adapters (save_lora_adapter / load_lora_adapter)
    objectives    SFT loss, log π(completion | prompt), completion logits, token batches, lm_problem
    generation    KV-cache generation (greedy, temperature, top-p), left-padded batches, EOS stopping
    memory        peak-memory estimates (params, grads, Adam, HVP, Fisher products, per-example gradients)
    lora          LoRA adapters (both families) merged at apply time, and the mask that selects them
"""
from alignment_geom.models import generation, hf, llama, lora, memory, objectives
from alignment_geom.models.generation import generate
from alignment_geom.models.hf import (
    fsdp_config,
    load_lora_adapter,
    load_pretrained,
    param_shardings,
    save_lora_adapter,
    save_pretrained,
)
from alignment_geom.models.llama import Llama3RoPE, LlamaConfig, forward, hidden_states, lm_head
from alignment_geom.models.llama import init_params as init_llama
from alignment_geom.models.lora import (
    LLAMA_LORA_TARGETS,
    LoRAConfig,
    init_lora,
    lora_mask,
    lora_merged_params,
    lora_tree,
    merge_lora,
)
from alignment_geom.models.memory import MemoryEstimate, estimate_memory
from alignment_geom.models.objectives import (
    LMFunction,
    completion_logits,
    completion_logprob,
    lm_problem,
    make_batch,
    sft_loss,
)

__all__ = ["lora", "llama", "hf", "objectives", "generation", "memory",
           "LoRAConfig", "LLAMA_LORA_TARGETS", "init_lora", "merge_lora", "lora_tree", "lora_mask",
           "lora_merged_params",
           "LlamaConfig", "Llama3RoPE", "init_llama", "forward", "hidden_states", "lm_head",
           "load_pretrained", "save_pretrained", "param_shardings", "fsdp_config", "save_lora_adapter",
           "load_lora_adapter",
           "make_batch", "sft_loss", "completion_logprob", "completion_logits", "lm_problem", "LMFunction",
           "generate", "estimate_memory", "MemoryEstimate"]
