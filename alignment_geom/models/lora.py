"""LoRA (Hu et al.) as separate adapter parameters merged at apply time, for both model families.

The trainable tree is ``{"base": θ₀, "lora": adapters}``; :func:`lora_mask` selects the adapters (the mask of
masked curvature) and :func:`merge_lora` gives the merged base-shaped θ = θ₀ + Δθ. The scale is
s = α/r (``LoRAConfig.scale``; α/√r with ``rslora=True``, as PEFT's use_rslora).

* A tree of per-block Dense layers ``{block_i: {module: {"kernel"}}}``: for a kernel W₀ ∈ ℝ^{in×out},
  W = W₀ + s·A B with A ∈ ℝ^{in×r} (Gaussian, scale 1/√in) and B ∈ ℝ^{r×out} (zero);
  adapters ``{block: {module: {"A", "B"}}}`` over LORA_TARGETS.
* The Llama/Qwen3 family (:mod:`alignment_geom.models.llama`): for a projection W₀ ∈ ℝ^{out×in} (the Hugging Face
  layout, y = x W₀ᵀ), W = W₀ + s·B A with A ∈ ℝ^{r×in} (uniform ±1/√in, PEFT's default) and B ∈ ℝ^{out×r}
  (zero), stacked over layers: adapters ``{target: {"A": (L, r, in), "B": (L, out, r)}}`` over any subset of
  LLAMA_LORA_TARGETS. ``llama.forward(..., lora=adapters, lora_scale=s)`` applies them as x W₀ᵀ + s (x Aᵀ) Bᵀ,
  equal to the merged weight, without forming it. PEFT-format export/import: :mod:`alignment_geom.models.hf`.

B = 0 at initialisation, so W = W₀.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
LLAMA_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_ALL_TARGETS = tuple(dict.fromkeys(LORA_TARGETS + LLAMA_LORA_TARGETS))

__all__ = ["LORA_TARGETS", "LLAMA_LORA_TARGETS", "LoRAConfig", "init_lora", "merge_lora", "lora_tree", "lora_mask",
           "lora_merged_params"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters: rank r, α (ΔW = s·A B with s = α/r, or α/√r when ``rslora``), target modules
    (toy: LORA_TARGETS; Llama/Qwen3: LLAMA_LORA_TARGETS). Hashable (targets are stored as a tuple)."""
    rank: int = 4
    alpha: float = 8.0
    targets: Sequence[str] = LORA_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in _ALL_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRAConfig.targets must be a non-empty subset of {LORA_TARGETS} (toy model) or "
                             f"{LLAMA_LORA_TARGETS} (Llama/Qwen3), got {self.targets}")

    @property
    def scale(self) -> float:
        r = float(self.rank)
        return float(self.alpha) / (r ** 0.5 if self.rslora else r)


def _is_stacked(params) -> bool:
    """True for the Llama/Qwen3 layout (layers stacked under "layers")."""
    return isinstance(params, dict) and "layers" in params and "q" in params["layers"]


def _lora_sites(params, targets):
    """[(block_name, module_name)] of the Dense layers LoRA adapts, in a fixed order."""
    return [(b, m) for b in sorted(params) if b.startswith("block_") for m in targets if m in params[b]]


def _init_stacked(params, lcfg, key):
    bad = [t for t in lcfg.targets if t not in LLAMA_LORA_TARGETS]
    if bad:
        raise ValueError(f"LoRAConfig.targets {bad} are not projections of the Llama/Qwen3 model; "
                         f"allowed: {LLAMA_LORA_TARGETS}")
    keys = jax.random.split(key, len(lcfg.targets))
    out = {}
    for kk, t in zip(keys, lcfg.targets):
        W = params["layers"][t]
        L, dout, din = W.shape
        bound = float(din) ** -0.5
        A = jax.random.uniform(kk, (L, lcfg.rank, din), jnp.float32, -bound, bound).astype(W.dtype)
        out[t] = {"A": A, "B": jnp.zeros((L, dout, lcfg.rank), W.dtype)}
    return out


def init_lora(params: PyTree, lcfg: LoRAConfig, key) -> PyTree:
    """Adapters for ``params`` (either family, see the module docstring); B = 0 so the model is unchanged.

    Toy: {block: {module: {"A": (in, r), "B": (r, out)}}}, A ~ N(0, 1/in). Llama/Qwen3:
    {target: {"A": (L, r, in), "B": (L, out, r)}}, A ~ U(−1/√in, 1/√in)."""
    if _is_stacked(params):
        return _init_stacked(params, lcfg, key)
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
    """θ = θ₀ with every adapted weight W₀ replaced by W₀ + scale · A B (toy) or W₀ + scale · B A
    (Llama/Qwen3, per layer) (a new tree; pure)."""
    if _is_stacked(base):
        layers = dict(base["layers"])
        for t, ab in lora.items():
            layers[t] = layers[t] + scale * jnp.einsum("lor,lri->loi", ab["B"], ab["A"])
        return {**base, "layers": layers}
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
