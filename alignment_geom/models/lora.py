"""LoRA (Hu et al.) as separate adapter parameters merged at apply time.

For a target Dense layer with kernel W₀ ∈ ℝ^{in×out}, W = W₀ + (α/r)·A B with A ∈ ℝ^{in×r} (Gaussian init,
scale 1/√in) and B ∈ ℝ^{r×out} (zero init), so W = W₀ at initialisation. The trainable tree is
``{"base": θ₀, "lora": {block: {module: {"A", "B"}}}}``; :func:`lora_mask` selects the adapters (the mask of
masked curvature) and :func:`merge_lora` gives the merged base-shaped θ = θ₀ + Δθ used for every curvature
quantity.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")

__all__ = ["LORA_TARGETS", "LoRAConfig", "init_lora", "merge_lora", "lora_tree", "lora_mask", "lora_merged_params"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters: rank r, scale α (ΔW = (α/r) A B), target module names."""
    rank: int = 4
    alpha: float = 8.0
    targets: Sequence[str] = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRAConfig.targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def _lora_sites(params, targets):
    """[(block_name, module_name)] of the Dense layers LoRA adapts, in a fixed order."""
    return [(b, m) for b in sorted(params) if b.startswith("block_") for m in targets if m in params[b]]


def init_lora(params: PyTree, lcfg: LoRAConfig, key) -> PyTree:
    """Adapters {block: {module: {"A": (in, r), "B": (r, out)}}}; A ~ N(0, 1/in), B = 0."""
    sites = _lora_sites(params, lcfg.targets)
    keys = jax.random.split(key, max(len(sites), 1))
    out: Dict[str, Dict[str, Dict[str, jax.Array]]] = {}
    for kk, (b, m) in zip(keys, sites):
        W = params[b][m]["kernel"]
        din, dout = W.shape
        out.setdefault(b, {})[m] = {"A": jax.random.normal(kk, (din, lcfg.rank), W.dtype) * float(din) ** -0.5,
                                    "B": jnp.zeros((lcfg.rank, dout), W.dtype)}
    return out


def merge_lora(base: PyTree, lora: PyTree, scale: float) -> PyTree:
    """θ = θ₀ with every adapted kernel W₀ replaced by W₀ + scale · A B (a new tree; pure)."""
    merged = jax.tree_util.tree_map(lambda x: x, base)  # shallow structural copy
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in merged.items()}
    for b, mods in lora.items():
        for m, ab in mods.items():
            layer = dict(merged[b][m])
            layer["kernel"] = layer["kernel"] + scale * (ab["A"] @ ab["B"])
            merged[b] = dict(merged[b])
            merged[b][m] = layer
    return merged


def lora_tree(base: PyTree, lora: PyTree) -> PyTree:
    """The LoRA training tree {"base": θ₀, "lora": adapters}."""
    return {"base": base, "lora": lora}


def lora_mask(tree: PyTree) -> PyTree:
    """Boolean mask over a LoRA training tree: True on adapter leaves, False on θ₀."""
    return {"base": jax.tree_util.tree_map(lambda _: False, tree["base"]),
            "lora": jax.tree_util.tree_map(lambda _: True, tree["lora"])}


def lora_merged_params(tree: PyTree, lcfg: LoRAConfig) -> PyTree:
    return merge_lora(tree["base"], tree["lora"], lcfg.scale)
