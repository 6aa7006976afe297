"""Models whose curvature alignment_geom measures: pure functions of parameter pytrees.

    transformer   the small causal transformer of the Section-7 study (Flax linen)
    lora          LoRA adapters merged at apply time, and the mask that selects them
"""
from alignment_geom.models import lora, transformer
from alignment_geom.models.lora import LoRAConfig, init_lora, lora_mask, lora_merged_params, lora_tree, merge_lora
from alignment_geom.models.transformer import LMConfig, apply, init_params, param_count

__all__ = ["transformer", "lora", "LMConfig", "init_params", "apply", "param_count", "LoRAConfig", "init_lora",
           "merge_lora", "lora_tree", "lora_mask", "lora_merged_params"]
