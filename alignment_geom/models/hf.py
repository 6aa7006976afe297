"""Hugging Face checkpoints of the Llama/Qwen3 family: config.json and safetensors in, and out; PEFT LoRA adapters.

No torch or transformers at run time: configs are parsed here, tensors are read with ``safetensors``
(``framework="numpy"``, bfloat16 through ml_dtypes) slice by slice.

* :func:`config_from_hf` / :func:`config_to_hf` — config.json ↔ :class:`~alignment_geom.models.llama.LlamaConfig`.
  Every field is either understood (and checked), known to be inert (bookkeeping, dropout, ids), or refused
  with a one-line ``ValueError`` naming it (biases, sliding windows, other RoPE types, quantisation, …).
* :func:`load_pretrained` — a model directory (``model.safetensors``, or ``model.safetensors.index.json`` and its
  shards) → (cfg, params). With a ``jax.sharding.Mesh`` every tensor is built by
  ``jax.make_array_from_callback``: each device's block is read from the file as a slice, never the whole tensor
  onto one device. FSDP-style layout (:func:`param_specs`): each matrix is split over the mesh axis along its
  first non-layer dimension (the output features of a projection, the vocabulary of the embedding) when that
  divides, else along its second; vectors (RMSNorm weights) are replicated. :func:`fsdp_config` also splits
  the batch of the activations over that axis.
* :func:`save_pretrained` — (cfg, params) → a directory transformers loads (sharded with an index above
  ``max_shard_size``).
* :func:`save_lora_adapter` / :func:`load_lora_adapter` — LoRA adapters in the PEFT format
  (adapter_config.json + adapter_model.safetensors).

The name map is explicit (:data:`GLOBAL_NAMES`, :data:`LAYER_NAMES`); layer ``i`` of a stacked (L, …) leaf is the
Hugging Face tensor ``model.layers.{i}.<name>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy reader handles BF16)
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_geom.models.llama import ARCHITECTURES, PROJECTIONS, Llama3RoPE, LlamaConfig, param_shapes
from alignment_geom.models.lora import LoRAConfig

PyTree = Any

__all__ = ["GLOBAL_NAMES", "LAYER_NAMES", "DTYPES", "config_from_hf", "config_to_hf", "read_config", "param_specs",
           "param_shardings", "fsdp_config", "load_pretrained", "save_pretrained", "save_lora_adapter",
           "load_lora_adapter", "hf_names"]

GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
               "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "q_norm": "self_attn.q_norm.weight",
               "k_norm": "self_attn.k_norm.weight", "mlp_norm": "post_attention_layernorm.weight",
               "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
LORA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DTYPES = ("bfloat16", "float16", "float32", "float64")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

# config.json fields that do not change the function computed (bookkeeping, training-only, generation ids)
_INERT = frozenset((
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "name_or_path",
    "_commit_hash", "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "pad_token_id",
    "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "cross_attention_hidden_size", "_attn_implementation_autoset", "auto_map", "max_position_embeddings",
    "max_window_layers"))
_ROPE_KEYS = {"default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
              "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
                         "high_freq_factor", "original_max_position_embeddings"}}


def _bad(field, value, allowed) -> ValueError:
    return ValueError(f"config.json field {field}={value!r} is not supported; allowed: {allowed}")


def _architecture(d: dict) -> str:
    arch = d.get("architectures")
    if arch is None:
        by_type = {v: k for k, v in _MODEL_TYPES.items()}
        if d.get("model_type") not in by_type:
            raise _bad("model_type", d.get("model_type"), sorted(by_type))
        return by_type[d["model_type"]]
    if not isinstance(arch, (list, tuple)) or len(arch) != 1 or arch[0] not in ARCHITECTURES:
        raise _bad("architectures", arch, [[a] for a in ARCHITECTURES])
    if "model_type" in d and d["model_type"] != _MODEL_TYPES[arch[0]]:
        raise _bad("model_type", d["model_type"], _MODEL_TYPES[arch[0]])
    return arch[0]


def _rope(d: dict) -> Tuple[float, Optional[Llama3RoPE]]:
    """(θ, llama3 scaling or None) from ``rope_scaling`` (older form) or ``rope_parameters``, as the reference
    reads them (rope_scaling first; θ from the dict, else the top-level rope_theta, else 10000)."""
    rp = d.get("rope_scaling") or d.get("rope_parameters") or {}
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if not isinstance(rp, dict):
        raise _bad(field, rp, "a dict or null")
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in _ROPE_KEYS:
        raise _bad(f"{field}.rope_type", rtype, sorted(_ROPE_KEYS))
    extra = sorted(set(rp) - _ROPE_KEYS[rtype])
    if extra:
        raise _bad(f"{field}.{extra[0]}", rp[extra[0]], f"the keys {sorted(_ROPE_KEYS[rtype])} for rope_type {rtype}")
    for src, name in ((rp, f"{field}.partial_rotary_factor"), (d, "partial_rotary_factor")):
        if src.get("partial_rotary_factor", 1.0) not in (None, 1.0, 1):
            raise _bad(name, src["partial_rotary_factor"], "1.0 (RoPE on the whole head)")
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rtype == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rp]
    if missing:
        raise ValueError(f"config.json field {field}.{missing[0]} is required for rope_type llama3")
    orig = d.get("original_max_position_embeddings",
                 rp.get("original_max_position_embeddings", d.get("max_position_embeddings", 2048)))
    return theta, Llama3RoPE(float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                             int(orig))


def config_from_hf(d: dict, *, remat: str = "full") -> LlamaConfig:
    """A :class:`LlamaConfig` from a config.json dict (the reference's defaults for absent fields)."""
    arch = _architecture(d)
    qwen = arch == "Qwen3ForCausalLM"
    understood = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window",
                  "layer_types"}
    for k in d:
        if k not in understood and k not in _INERT:
            raise ValueError(f"config.json field {k!r} is not supported by alignment_geom's {arch} "
                             f"(understood: {sorted(understood)}; ignored: the bookkeeping fields)")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if k not in d:
            raise ValueError(f"config.json field {k} is required")
    if d.get("hidden_act", "silu") != "silu":
        raise _bad("hidden_act", d["hidden_act"], "silu")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k, False):
            raise _bad(k, d[k], "false (no biases)")
    if d.get("use_sliding_window", False):
        raise _bad("use_sliding_window", d["use_sliding_window"], "false (full attention in every layer)")
    if d.get("sliding_window") is not None and not qwen:
        raise _bad("sliding_window", d["sliding_window"], "null")
    lt = d.get("layer_types")
    if lt is not None and any(t != "full_attention" for t in lt):
        raise _bad("layer_types", lt, "full_attention for every layer")
    H = int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is None:
        head_dim = 128 if (qwen and "head_dim" not in d) else int(d["hidden_size"]) // H
    kv = d.get("num_key_value_heads")
    if kv is None:
        kv = 32 if (qwen and "num_key_value_heads" not in d) else H
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    theta, scaling = _rope(d)
    return LlamaConfig(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]), num_heads=H,
        num_kv_heads=int(kv), head_dim=int(head_dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        architecture=arch, max_position_embeddings=int(d.get("max_position_embeddings", 32768 if qwen else 2048)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=eos, pad_token_id=d.get("pad_token_id"), remat=remat)


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
    """The config.json dict of ``cfg`` (RoPE in the rope_theta + rope_scaling form every transformers reads)."""
    eos = list(cfg.eos_token_id)
    d = {"architectures": [cfg.architecture], "model_type": _MODEL_TYPES[cfg.architecture],
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
         "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "rope_theta": cfg.rope_theta,
         "rope_scaling": None, "bos_token_id": cfg.bos_token_id,
         "eos_token_id": (eos[0] if len(eos) == 1 else (eos or None)), "pad_token_id": cfg.pad_token_id,
         "dtype": dtype}
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.qk_norm:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
        d["mlp_bias"] = False
    return d


def read_config(path: str, *, remat: str = "full") -> LlamaConfig:
    """The LlamaConfig of the checkpoint directory ``path`` (its config.json)."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise ValueError(f"path {path!r} is not a Hugging Face model directory (no config.json)")
    with open(f) as fh:
        return config_from_hf(json.load(fh), remat=remat)


# --------------------------------------------------------------------------- names and sharding


def hf_names(cfg: LlamaConfig) -> Dict[str, Any]:
    """{leaf path: HF name} for global leaves and {leaf: [HF name per layer]} under "layers"."""
    shapes = param_shapes(cfg)
    out: Dict[str, Any] = {k: GLOBAL_NAMES[k] for k in shapes if k != "layers"}
    out["layers"] = {k: [f"model.layers.{i}.{LAYER_NAMES[k]}" for i in range(cfg.num_layers)]
                     for k in shapes["layers"]}
    return out


def _spec(shape, layered: bool, n: int, axis: str) -> P:
    first = 1 if layered else 0
    dims = list(range(first, len(shape)))
    if len(dims) >= 2:
        for dim in dims[:2]:
            if shape[dim] % n == 0:
                spec = [None] * len(shape)
                spec[dim] = axis
                return P(*spec)
    return P()


def _mesh_axis(mesh: Mesh, axis: Optional[str]) -> str:
    names = tuple(mesh.axis_names)
    if axis is None:
        if "fsdp" in names:
            return "fsdp"
        if len(names) == 1:
            return names[0]
        raise ValueError(f"mesh has axes {names}: pass axis= (the axis parameters are sharded over)")
    if axis not in names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh; allowed: {names}")
    return axis


def param_specs(cfg: LlamaConfig, n: int, axis: str = "fsdp") -> PyTree:
    """PartitionSpecs of the FSDP layout over ``n`` devices of mesh axis ``axis`` (see the module docstring)."""
    shapes = param_shapes(cfg)
    out = {k: _spec(s, False, n, axis) for k, s in shapes.items() if k != "layers"}
    out["layers"] = {k: _spec(s, True, n, axis) for k, s in shapes["layers"].items()}
    return out


def param_shardings(cfg: LlamaConfig, mesh: Mesh, axis: Optional[str] = None) -> PyTree:
    """NamedShardings of the FSDP layout on ``mesh`` (``jax.device_put(params, param_shardings(...))``)."""
    ax = _mesh_axis(mesh, axis)
    specs = param_specs(cfg, int(mesh.shape[ax]), ax)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def fsdp_config(cfg: LlamaConfig, mesh: Mesh, axis: Optional[str] = None) -> LlamaConfig:
    """cfg with the hidden states' batch split over the parameters' mesh axis (``cfg.activation_sharding``):
    the FSDP layout, where each layer's weights are gathered inside the layer loop. The batch must divide by
    the axis size."""
    ax = _mesh_axis(mesh, axis)
    return dataclasses.replace(cfg, activation_sharding=NamedSharding(mesh, P(ax)))


# --------------------------------------------------------------------------- loading


def _weight_files(path: str) -> Dict[str, str]:
    """{tensor name: file} from model.safetensors.index.json, or every tensor of model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as fh:
            return {k: os.path.join(path, v) for k, v in json.load(fh)["weight_map"].items()}
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"path {path!r} has neither model.safetensors nor model.safetensors.index.json "
                     "(only safetensors checkpoints are read)")


def _check_names(cfg, names, files, handles):
    expected = {}
    shapes = param_shapes(cfg)
    for k, s in shapes.items():
        if k != "layers":
            expected[names[k]] = tuple(s)
    for k, s in shapes["layers"].items():
        for n in names["layers"][k]:
            expected[n] = tuple(s[1:])
    for n, s in expected.items():
        if n not in files:
            raise ValueError(f"checkpoint tensor {n} is missing (architecture {cfg.architecture})")
        got = tuple(handles[files[n]].get_slice(n).get_shape())
        if got != s:
            raise ValueError(f"checkpoint tensor {n} has shape {got}, expected {s} from config.json")
    for n in files:
        if n in expected or n.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and n == "lm_head.weight"):
            continue
        raise ValueError(f"checkpoint tensor {n} is not part of the supported {cfg.architecture} "
                         f"(e.g. biases are not supported)")


def load_pretrained(path: str, *, dtype: str = "bfloat16", mesh: Optional[Mesh] = None, axis: Optional[str] = None,
                    remat: str = "full") -> Tuple[LlamaConfig, PyTree]:
    """(cfg, params) of the Hugging Face checkpoint directory ``path``, params stored in ``dtype``.

    ``mesh``: place every tensor with the FSDP layout (:func:`param_specs`) over mesh axis ``axis`` (default
    "fsdp" if the mesh has it, else its only axis), each device's block read straight from the file.
    ``remat``: the block rematerialisation policy of the returned cfg.
    """
    from safetensors import safe_open

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if mesh is not None:
        axis = _mesh_axis(mesh, axis)
    cfg = read_config(path, remat=remat)
    names = hf_names(cfg)
    files = _weight_files(path)
    npdt = np.dtype(dtype)
    shardings = param_shardings(cfg, mesh, axis) if mesh is not None else None
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(files.values()))}

        def read(name, index=()):
            return handles[files[name]].get_slice(name)[tuple(index)].astype(npdt)

        _check_names(cfg, names, files, handles)
        shapes = param_shapes(cfg)

        def build(shape, hf, sharding):
            layered = isinstance(hf, list)

            def block(index):
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                if not layered:
                    return read(hf, index)
                rows = range(*index[0].indices(shape[0]))
                return np.stack([read(hf[i], index[1:]) for i in rows]) if len(rows) else np.zeros(
                    (0,) + tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])), npdt)

            if sharding is None:
                return jnp.asarray(block(()))
            return jax.make_array_from_callback(tuple(shape), sharding, block)

        params = {k: build(s, names[k], None if shardings is None else shardings[k])
                  for k, s in shapes.items() if k != "layers"}
        params["layers"] = {k: build(s, names["layers"][k], None if shardings is None else shardings["layers"][k])
                            for k, s in shapes["layers"].items()}
    return cfg, params


# --------------------------------------------------------------------------- saving


def _parse_size(size) -> int:
    if isinstance(size, (int, np.integer)) and size > 0:
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size))
    if not m:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or like '5GB' / '500MiB', got {size!r}")
    unit = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _tensors(cfg: LlamaConfig, params: PyTree):
    """(HF name, numpy array) in the checkpoint order, one stacked leaf fetched at a time."""
    names = hf_names(cfg)
    for k in ("embed",):
        yield names[k], np.asarray(params[k])
    for k, per_layer in names["layers"].items():
        stacked = np.asarray(params["layers"][k])
        for i, n in enumerate(per_layer):
            yield n, stacked[i]
    yield names["norm"], np.asarray(params["norm"])
    if not cfg.tie_word_embeddings:
        yield names["lm_head"], np.asarray(params["lm_head"])


def save_pretrained(cfg: LlamaConfig, params: PyTree, path: str, *, max_shard_size="5GB") -> None:
    """Write config.json and the weights as safetensors under ``path`` (created), in the params' dtype.

    Above ``max_shard_size`` (bytes, or a string like "5GB") the weights are split into
    model-0000k-of-0000N.safetensors files with a model.safetensors.index.json."""
    from safetensors.numpy import save_file

    limit = _parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    dtype = str(jnp.dtype(params["embed"].dtype))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config_to_hf(cfg, dtype), fh, indent=2)
    shards, cur, cur_size, total = [], {}, 0, 0
    for name, arr in _tensors(cfg, params):
        if cur and cur_size + arr.nbytes > limit:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[name] = np.ascontiguousarray(arr)
        cur_size += arr.nbytes
        total += arr.nbytes
    shards.append(cur)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)


# --------------------------------------------------------------------------- PEFT LoRA adapters

_PEFT_PREFIX = "base_model.model.model.layers"
# adapter_config.json fields that must keep their neutral value for W = W₀ + s·B A on whole projections
_PEFT_NEUTRAL = {"use_dora": (False, None), "bias": ("none",), "lora_bias": (False, None),
                 "fan_in_fan_out": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                 "layers_to_transform": (None,), "layer_replication": (None,), "modules_to_save": (None, []),
                 "trainable_token_indices": (None,), "target_parameters": (None, []), "use_qalora": (False, None),
                 "use_bdlora": (None, False), "alora_invocation_tokens": (None,)}


def save_lora_adapter(cfg: LlamaConfig, lcfg: LoRAConfig, adapters: PyTree, path: str, *,
                      base_model_name_or_path: Optional[str] = None) -> None:
    """Write adapters {target: {"A": (L, r, in), "B": (L, out, r)}} as a PEFT LoRA adapter under ``path``."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for t, ab in adapters.items():
        A, B = np.asarray(ab["A"]), np.asarray(ab["B"])
        for i in range(cfg.num_layers):
            base = f"{_PEFT_PREFIX}.{i}.{LORA_MODULES[t]}"
            tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(A[i])
            tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(B[i])
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lcfg.rank), "lora_alpha": float(lcfg.alpha),
            "target_modules": sorted(LORA_MODULES[t].split(".")[-1] for t in adapters), "lora_dropout": 0.0,
            "bias": "none", "use_rslora": bool(lcfg.rslora), "use_dora": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path}
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(conf, fh, indent=2)


def load_lora_adapter(cfg: LlamaConfig, path: str, *, dtype: Optional[str] = None) -> Tuple[LoRAConfig, PyTree]:
    """(LoRAConfig, adapters) of a PEFT LoRA adapter directory for the model ``cfg`` (in ``dtype``; default: as
    stored)."""
    from safetensors import safe_open

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    with open(os.path.join(path, "adapter_config.json")) as fh:
        conf = json.load(fh)
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json field peft_type={conf.get('peft_type')!r} is not supported; "
                         "allowed: 'LORA'")
    for k, ok in _PEFT_NEUTRAL.items():
        if k in conf and conf[k] not in ok:
            raise ValueError(f"adapter_config.json field {k}={conf[k]!r} is not supported; allowed: {ok[0]!r}")
    by_module = {m.split(".")[-1]: t for t, m in LORA_MODULES.items()}
    pat = re.compile(rf"{re.escape(_PEFT_PREFIX)}\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
    found: Dict[str, Dict[str, Dict[int, np.ndarray]]] = {}
    npdt = None if dtype is None else np.dtype(dtype)
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            m = pat.fullmatch(name)
            if m is None or m.group(3) not in by_module:
                raise ValueError(f"adapter tensor {name} is not a LoRA factor of a q/k/v/o/gate/up/down projection")
            t = by_module[m.group(3)]
            x = f.get_tensor(name)
            found.setdefault(t, {"A": {}, "B": {}})[m.group(4)][int(m.group(1))] = x if npdt is None else x.astype(npdt)
    r = int(conf["r"])
    adapters = {}
    for t, ab in found.items():
        if sorted(ab["A"]) != list(range(cfg.num_layers)) or sorted(ab["B"]) != list(range(cfg.num_layers)):
            raise ValueError(f"adapter {t} does not cover layers 0..{cfg.num_layers - 1}")
        A = np.stack([ab["A"][i] for i in range(cfg.num_layers)])
        B = np.stack([ab["B"][i] for i in range(cfg.num_layers)])
        if A.shape[1] != r or B.shape[2] != r:
            raise ValueError(f"adapter {t} has rank {A.shape[1]}, adapter_config.json says r={r}")
        adapters[t] = {"A": jnp.asarray(A), "B": jnp.asarray(B)}
    targets = tuple(t for t in PROJECTIONS if t in adapters)
    lcfg = LoRAConfig(rank=r, alpha=float(conf["lora_alpha"]), targets=targets,
                      rslora=bool(conf.get("use_rslora", False)))
    return lcfg, adapters
