"""The Llama-3.x / Qwen3 family against the reference implementation (transformers + torch, CPU).

Every checkpoint is a tiny random model written here by transformers (hidden 32, 2 layers, vocab 96, weights
~N(0, 0.3²) so the logits are O(5) and differences show); nothing is downloaded. Logit tolerance: float32,
max |z − z_ref| ≤ 1e-5 · max(1, max |z_ref|).

The run time is XLA compilation (the programs are tiny): each reference checkpoint is built once per module,
each compiled function is shared between the tests that use it, and the suite compiles with XLA's backend
optimisations off (tests/conftest.py)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from alignment_geom import aic, curvature
from alignment_geom import models as M
from alignment_geom.models import hf, llama, memory

V = 96
T = 24  # > original_max_position_embeddings = 16 of the llama3 RoPE scaling below
TOL = 1e-5

SPECS = {
    # llama3 RoPE scaling, GQA (4 query heads on 2 key-value heads), tied / untied output embedding
    "llama_tied": dict(arch="llama", tie=True),
    "llama_untied": dict(arch="llama", tie=False),
    # per-head q/k RMSNorm, head_dim 16 != hidden / heads = 8, GQA
    "qwen3": dict(arch="qwen3", tie=False),
    "qwen3_tied": dict(arch="qwen3", tie=True),
}


def _hf_config(arch, tie):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5,
            rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16})
    return transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie, rope_theta=1e6, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.3 * noise)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{name: (directory, the transformers model in float32 eval mode)}."""
    out = {}
    for i, (name, s) in enumerate(SPECS.items()):
        c = _hf_config(s["arch"], s["tie"])
        c._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(c)
        _randomize(model, i).eval()
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def loaded(ckpts):
    return {k: M.load_pretrained(p, dtype="float32") for k, (p, _) in ckpts.items()}


@pytest.fixture(scope="module")
def data():
    """tok (3, T), mask (3, T) with row 1 left-padded and row 2 right-padded; rows (7, T) = the three rows
    unpadded, padded, and row 1's real tokens right-padded (every forward below runs on ``rows``: one
    compilation per model)."""
    rng = np.random.default_rng(0)
    tok = rng.integers(3, V, (3, T)).astype(np.int32)
    mask = np.ones_like(tok)
    mask[1, :5] = 0
    mask[2, 19:] = 0
    shifted = np.zeros_like(tok[1:2])
    shifted[0, :T - 5] = tok[1, 5:]
    rows = np.concatenate([tok, tok, shifted])
    row_mask = np.concatenate([np.ones_like(mask), mask, (np.arange(T) < T - 5)[None].astype(mask.dtype)])
    return dict(tok=tok, mask=mask, rows=rows, row_mask=row_mask)


def _hf_logits(model, tok, mask=None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long))
    with torch.no_grad():
        return model(input_ids=torch.tensor(tok, dtype=torch.long), **kw).logits.double().numpy()


def _err(z, ref, mask=None):
    """max |z − ref| / max(1, max |ref|) over the real (unpadded) tokens."""
    z, ref = np.asarray(z, np.float64), np.asarray(ref, np.float64)
    sel = np.ones(z.shape[:2], bool) if mask is None else mask.astype(bool)
    return float(np.abs(z - ref)[sel].max() / max(1.0, np.abs(ref[sel]).max()))


_fwd = jax.jit(M.forward, static_argnums=0)


def _z(cfg, params, d, lora=None, scale=1.0):
    """Our logits on the 7 rows of ``data``."""
    return _fwd(cfg, params, d["rows"], attention_mask=d["row_mask"], lora=lora, lora_scale=scale)


def _check_rows(z, model, d):
    """The 7 rows against transformers: unpadded, padded (real tokens), and left = right padding."""
    tok, mask = d["tok"], d["mask"]
    ref = _hf_logits(model, tok)
    assert _err(z[:3], ref) <= TOL
    assert _err(z[3:6], _hf_logits(model, tok, mask), mask) <= TOL
    np.testing.assert_allclose(np.asarray(z[4, 5:]), np.asarray(z[6, :T - 5]), rtol=0, atol=TOL)
    return ref


_objectives = jax.jit(lambda cfg, params, b: (M.forward(cfg, params, b["tokens"], attention_mask=b["attention_mask"]),
                                              M.completion_logprob(cfg, params, b),
                                              M.completion_logits(cfg, params, b), M.sft_loss(cfg, params, b)),
                      static_argnums=0)


# --------------------------------------------------------------------------- logits, gradients


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_parity_with_transformers(name, ckpts, loaded, data):
    _, model = ckpts[name]
    cfg, params = loaded[name]
    assert jnp.dtype(params["embed"].dtype) == jnp.float32
    z = _z(cfg, params, data)
    assert z.dtype == jnp.float32 and z.shape == (7, T, V)
    ref = _check_rows(z, model, data)
    assert np.abs(ref).max() > 2.0  # the random model is far from uniform: the comparison has teeth


def test_negative_controls_break_parity(ckpts, loaded, data):
    tok = data["tok"]
    cfg, params = loaded["llama_tied"]
    ref = _hf_logits(ckpts["llama_tied"][1], tok)
    no_scaling = dataclasses.replace(cfg, rope_scaling=None)
    assert _err(_z(no_scaling, params, data)[:3], ref) > 1e3 * TOL
    cfg, params = loaded["qwen3"]
    ref = _hf_logits(ckpts["qwen3"][1], tok)
    no_qk = dataclasses.replace(cfg, architecture="LlamaForCausalLM")
    plain = {**params, "layers": {k: v for k, v in params["layers"].items() if k not in ("q_norm", "k_norm")}}
    assert _err(_z(no_qk, plain, data)[:3], ref) > 1e3 * TOL


@pytest.mark.parametrize("name", ["llama_untied", "qwen3_tied"])
def test_gradient_parity_per_parameter(name, ckpts, loaded, data):
    """∇θ of the masked SFT loss against torch autograd of transformers' own loss (labels = −100 off-target),
    per parameter tensor (relative L2 error ≤ 1e-5 in float32)."""
    _, model = ckpts[name]
    cfg, params = loaded[name]
    tok = data["tok"]
    prompts = [list(tok[b, :8]) for b in range(3)]
    comps = [list(tok[b, 8:8 + n]) for b, n in enumerate((10, 6, 3))]
    batch = M.make_batch(prompts, comps, padding="left")
    # Qwen3: the loss with its logits formed 4 positions at a time (3 chunks, the last one padded)
    loss_fn = M.LMFunction(cfg, "sft_loss", chunk=4 if name == "qwen3_tied" else None)
    loss, g = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    labels = np.where(np.zeros_like(batch["tokens"], bool), 0, -100)
    for b in range(3):
        for k in range(int(batch["weights"][b].sum())):
            labels[b, batch["pos"][b, k] + 1] = batch["targets"][b, k]
    model.zero_grad()
    out = model(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"]),
                position_ids=torch.tensor(np.maximum(np.cumsum(batch["attention_mask"], 1) - 1, 0)),
                labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    ref = {n: p.grad.numpy() for n, p in model.named_parameters()}
    names = hf.hf_names(cfg)
    pairs = [(names[k], g[k]) for k in g if k != "layers"]
    pairs += [(n, g["layers"][k][i]) for k, per in names["layers"].items() for i, n in enumerate(per)]
    assert len(pairs) == len(ref)
    for n, gj in pairs:
        gj, gr = np.asarray(gj, np.float64), ref[n].astype(np.float64)
        rel = np.linalg.norm(gj - gr) / np.linalg.norm(gr)
        assert rel <= 1e-5, (n, rel)


# --------------------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_loads_identically(ckpts, loaded, tmp_path):
    _, model = ckpts["qwen3"]
    path = str(tmp_path / "sharded")
    model.save_pretrained(path, max_shard_size="8KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as fh:
        files = set(json.load(fh)["weight_map"].values())
    assert len(files) >= 8
    _, p2 = M.load_pretrained(path, dtype="float32")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded["qwen3"][1], p2)


def test_bf16_loads_as_bf16(ckpts, loaded, data, tmp_path):
    path, model = ckpts["llama_tied"]
    cfg, pb = M.load_pretrained(path, dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(pb)} == {"bfloat16"}
    # float32 weights rounded to bfloat16, as torch rounds them
    want = model.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(pb["layers"]["up"][1], np.float32), want)
    z = _z(cfg, pb, data)
    assert z.dtype == jnp.float32
    # a bfloat16 checkpoint on disk: read bit-exactly, in bfloat16 and upcast to float32
    p16 = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(p16)
    model.float()
    _, pb2 = M.load_pretrained(p16, dtype="bfloat16")
    _, pf2 = M.load_pretrained(p16, dtype="float32")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), pb, pb2)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b)),
                           pb2, pf2)


@pytest.mark.parametrize("name", ["llama_tied", "qwen3"])
def test_save_pretrained_round_trips_through_transformers(name, loaded, data, tmp_path):
    cfg, params = loaded[name]
    for sub, shard in (("single", "5GB"), ("sharded", 4096)):
        path = str(tmp_path / sub)
        M.save_pretrained(cfg, params, path, max_shard_size=shard)
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == (sub == "sharded")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        _check_rows(_z(cfg, params, data), model, data)
        cfg2, p2 = M.load_pretrained(path, dtype="float32")
        assert cfg2 == cfg
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               params, p2)


def test_config_forms_and_errors(ckpts):
    path, _ = ckpts["llama_tied"]
    with open(os.path.join(path, "config.json")) as fh:
        d = json.load(fh)
    cfg = hf.config_from_hf(d)
    # the older form: top-level rope_theta and rope_scaling with "type"
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    rp = dict(d["rope_parameters"])
    old["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    old["rope_scaling"] = rp
    assert hf.config_from_hf(old) == cfg
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    bad = {
        "attention_bias": True, "mlp_bias": True, "hidden_act": "gelu", "quantization_config": {"bits": 4},
        "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
        "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field) as e:
            hf.config_from_hf({**d, field: value})
        assert "\n" not in str(e.value)
    q = hf.config_from_hf(hf.config_to_hf(hf.read_config(ckpts["qwen3"][0])))
    with pytest.raises(ValueError, match="use_sliding_window"):
        hf.config_from_hf({**hf.config_to_hf(q), "use_sliding_window": True})
    with pytest.raises(ValueError, match="dtype"):
        M.load_pretrained(path, dtype="int8")


def test_bias_tensor_is_refused(ckpts, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = ckpts["llama_untied"]
    out = tmp_path / "biased"
    out.mkdir()
    (out / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        M.load_pretrained(str(out), dtype="float32")


def test_published_configs_parse():
    """Qwen3-1.7B and Llama-3.2-3B as published (memory.PUBLISHED_CONFIGS): the parameter counts of the model
    cards (1.72 B with tied embeddings; 3.21 B)."""
    counts = {}
    for name, d in memory.PUBLISHED_CONFIGS.items():
        cfg = hf.config_from_hf(d)
        counts[name] = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(
            llama.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    assert counts == {"Qwen/Qwen3-1.7B": 1_720_574_976, "meta-llama/Llama-3.2-3B": 3_212_749_824}


# --------------------------------------------------------------------------- objectives


def test_make_batch_and_objectives(loaded, data):
    cfg, params = loaded["qwen3"]
    tok = data["tok"]
    prompts, comps = [list(tok[0, :5]), list(tok[1, :9])], [list(tok[0, 5:9]), list(tok[1, 9:11])]
    for padding in ("right", "left"):
        b = M.make_batch(prompts, comps, padding=padding, length=16)
        assert b["tokens"].shape == (2, 16) and b["pos"].shape == (2, 4)
        for r in range(2):
            for k in range(len(comps[r])):
                assert b["tokens"][r, b["pos"][r, k] + 1] == comps[r][k]
        z, lp_ours, zc, loss = _objectives(cfg, params, b)
        lp = jax.nn.log_softmax(np.asarray(z, np.float64), axis=-1)
        want = [sum(lp[r, b["pos"][r, k], comps[r][k]] for k in range(len(comps[r]))) for r in range(2)]
        np.testing.assert_allclose(np.asarray(lp_ours), want, rtol=1e-5)
        zc = np.asarray(zc)
        np.testing.assert_allclose(zc[1, :2], np.asarray(z)[1, b["pos"][1, :2]], rtol=1e-5, atol=1e-5)
        assert np.all(zc[1, 2:] == 0)  # padded completion slots: constant logits
        np.testing.assert_allclose(float(loss), -sum(want) / 6, rtol=1e-5)
    with pytest.raises(ValueError, match="length"):
        M.make_batch(prompts, comps, length=8)
    with pytest.raises(ValueError, match="padding"):
        M.make_batch(prompts, comps, padding="middle")


# --------------------------------------------------------------------------- generation


def _prompts(seed, lens=(7, 4, 10)):
    rng = np.random.default_rng(seed)
    T0 = max(lens)
    tok, mask = np.zeros((len(lens), T0), np.int32), np.zeros((len(lens), T0), np.int32)
    for b, n in enumerate(lens):
        tok[b, T0 - n:] = rng.integers(3, V, n)
        mask[b, T0 - n:] = 1
    return tok, mask


@pytest.mark.parametrize("name", ["llama_tied", "qwen3"])
def test_greedy_generation_equals_transformers(name, ckpts, loaded):
    """Left-padded batch, 12 new tokens (prompt + new > 16 = the llama3 original context), with and without an
    EOS id (chosen as a token row 0 emits, so that row stops early and is padded)."""
    _, model = ckpts[name]
    cfg, params = loaded[name]
    tok, mask = _prompts(1)

    def ref(eos):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(tok, dtype=torch.long), attention_mask=torch.tensor(mask),
                                 max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
        return out.numpy()[:, tok.shape[1]:]

    ours = np.asarray(M.generate(cfg, params, tok, mask, max_new_tokens=12, eos_token_id=(), pad_token_id=0))
    np.testing.assert_array_equal(ours, ref(None))
    eos = int(ours[0, 3])
    ours_eos = np.asarray(M.generate(cfg, params, tok, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))
    want = ref(eos)
    np.testing.assert_array_equal(ours_eos[:, :want.shape[1]], want)
    assert np.all(ours_eos[0, 4:] == 0) and np.all(ours_eos[:, want.shape[1]:] == 0)


def test_sampled_generation(loaded):
    cfg, params = loaded["llama_tied"]
    tok, mask = _prompts(2)
    kw = dict(max_new_tokens=12, eos_token_id=(), pad_token_id=0)
    greedy = np.asarray(M.generate(cfg, params, tok, mask, **kw))
    a = np.asarray(M.generate(cfg, params, tok, mask, key=jax.random.PRNGKey(3), temperature=1.0, **kw))
    b = np.asarray(M.generate(cfg, params, tok, mask, key=jax.random.PRNGKey(3), temperature=1.0, **kw))
    c = np.asarray(M.generate(cfg, params, tok, mask, key=jax.random.PRNGKey(4), temperature=1.0, **kw))
    np.testing.assert_array_equal(a, b)  # deterministic for a key
    assert not np.array_equal(a, c) and a.min() >= 0 and a.max() < V
    # a nucleus holding only the most likely token is greedy decoding
    tiny = np.asarray(M.generate(cfg, params, tok, mask, key=jax.random.PRNGKey(3), temperature=1.0, top_p=1e-6,
                                 **kw))
    np.testing.assert_array_equal(tiny, greedy)
    z = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(M.generation.top_p_filter(z, 0.75)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    with pytest.raises(ValueError, match="left padding"):
        M.generate(cfg, params, tok, mask[:, ::-1].copy(), max_new_tokens=2)
    with pytest.raises(ValueError, match="PRNG key"):
        M.generate(cfg, params, tok, mask, max_new_tokens=2, temperature=0.7)


# --------------------------------------------------------------------------- LoRA and PEFT


def _lora_z(cfg, lcfg, tree, d):
    """Logits of the LoRA model (adapters applied at apply time) on the 7 rows of ``data``."""
    return _z(cfg, tree["base"], d, lora=tree["lora"], scale=jnp.float32(lcfg.scale))


def test_lora_apply_equals_merged_and_mask(loaded, data):
    cfg, params = loaded["qwen3"]
    lcfg = M.LoRAConfig(rank=2, alpha=5.0, targets=("q", "v", "down"))
    ad = M.init_lora(params, lcfg, jax.random.PRNGKey(0))
    assert ad["q"]["A"].shape == (2, 2, 32) and ad["q"]["B"].shape == (2, 64, 2)
    z0 = _lora_z(cfg, lcfg, M.lora_tree(params, ad), data)
    np.testing.assert_array_equal(np.asarray(z0), np.asarray(_z(cfg, params, data)))  # B = 0: the base model
    ad = {t: {"A": ab["A"], "B": 0.1 * jnp.ones_like(ab["B"])} for t, ab in ad.items()}
    tree = M.lora_tree(params, ad)
    z = _lora_z(cfg, lcfg, tree, data)
    np.testing.assert_allclose(np.asarray(z), np.asarray(_z(cfg, M.merge_lora(params, ad, lcfg.scale), data)),
                               rtol=1e-5, atol=1e-5)
    assert _err(z, _z(cfg, params, data)) > 1e-3
    mask = M.lora_mask(tree)
    assert all(jax.tree_util.tree_leaves(mask["lora"])) and not any(jax.tree_util.tree_leaves(mask["base"]))
    with pytest.raises(ValueError, match="mlp_in"):
        M.init_lora(params, M.LoRAConfig(targets=("mlp_in",)), jax.random.PRNGKey(0))


def _peft_logits(pm, d):
    with torch.no_grad():
        return pm(input_ids=torch.tensor(d["tok"], dtype=torch.long)).logits.double().numpy()


def test_peft_adapters_round_trip(ckpts, loaded, data, tmp_path):
    import peft

    path, model = ckpts["llama_untied"]
    cfg, params = loaded["llama_untied"]
    # peft → ours: an adapter with random (non-zero) B saved by peft
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    pc = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                         lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(base, pc).eval()
    pm.save_pretrained(str(tmp_path / "from_peft"))
    lcfg, ad = M.load_lora_adapter(cfg, str(tmp_path / "from_peft"))
    assert lcfg.rank == 3 and lcfg.scale == pytest.approx(7 / 3) and set(lcfg.targets) == {"k", "o", "gate", "up"}
    ref = _peft_logits(pm, data)
    assert _err(ref, _hf_logits(model, data["tok"])) > 1e-3  # the adapter changes the model
    assert _err(_lora_z(cfg, lcfg, M.lora_tree(params, ad), data)[:3], ref) <= TOL
    # ours → peft: random adapters on q and down, with rsLoRA scaling
    lc2 = M.LoRAConfig(rank=2, alpha=3.0, targets=("q", "down"), rslora=True)
    a2 = M.init_lora(params, lc2, jax.random.PRNGKey(1))
    a2 = {t: {"A": ab["A"], "B": 0.2 * jax.random.normal(jax.random.PRNGKey(2), ab["B"].shape, jnp.float32)}
          for t, ab in a2.items()}
    M.save_lora_adapter(cfg, lc2, a2, str(tmp_path / "ours"), base_model_name_or_path=path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    pm2 = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    assert _err(_lora_z(cfg, lc2, M.lora_tree(params, a2), data)[:3], _peft_logits(pm2, data)) <= TOL
    lc3, a3 = M.load_lora_adapter(cfg, str(tmp_path / "ours"))
    assert lc3 == lc2
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a2, a3)
    conf = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    with open(tmp_path / "ours" / "adapter_config.json", "w") as fh:
        json.dump({**conf, "use_dora": True}, fh)
    with pytest.raises(ValueError, match="use_dora"):
        M.load_lora_adapter(cfg, str(tmp_path / "ours"))


# --------------------------------------------------------------------------- curvature on the real family


def _sft_batches(tok):
    ft = M.make_batch([list(tok[b, :8]) for b in range(3)], [list(tok[b, 8:8 + n]) for b, n in enumerate((6, 4, 5))])
    safe = M.make_batch([list(tok[b, 12:18]) for b in range(3)], [list(tok[b, 18:22]) for b in range(3)])
    return ft, safe


@pytest.fixture(scope="module")
def sharded_setup(ckpts, data):
    """The llama checkpoint in float64, unsharded and loaded onto an 8-device FSDP mesh."""
    from jax.sharding import Mesh

    path, _ = ckpts["llama_tied"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    cfg, p1 = M.load_pretrained(path, dtype="float64")
    cfg8, p8 = M.load_pretrained(path, dtype="float64", mesh=mesh)
    assert cfg8 == cfg
    return cfg, p1, p8, mesh


def test_sharded_loading_places_blocks(sharded_setup):
    cfg, p1, p8, mesh = sharded_setup
    q = p8["layers"]["q"]  # (L, 32, 32): output features split over the 8 devices
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 4, 32)} and len(q.addressable_shards) == 8
    assert p8["embed"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert p8["norm"].sharding.is_fully_replicated
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p8)
    with pytest.raises(ValueError, match="axis"):
        M.load_pretrained(".", dtype="float64", mesh=mesh, axis="model")
    with pytest.raises(ValueError, match="config.json"):
        M.load_pretrained(".", dtype="float64")


def _rel(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5


@jax.jit
def _curv(problem, v):
    """z, g = ∇L, H g (the flow's acceleration) and F v: one compiled program, reused by the tests below."""
    g = jax.grad(problem.loss_fn)(problem.params, problem.batch)
    return (problem.logits_fn(problem.params, problem.inputs), g,
            curvature.hvp(problem.loss_fn, problem.params, g, problem.batch),
            curvature.fisher_vp(problem.logits_fn, problem.params, v, problem.inputs))


def _random_like(params):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.random.default_rng(x.size).standard_normal(x.shape)),
                                  params)


@pytest.fixture(scope="module")
def llama_curv(sharded_setup, data):
    """(v, _curv of the unsharded float64 llama problem at v): computed once, used by the two tests below."""
    cfg, p1, _, _ = sharded_setup
    ft, safe = _sft_batches(data["tok"])
    v = _random_like(p1)
    return v, _curv(M.lm_problem(cfg, p1, ft, safe), v)


def test_sharded_forward_grad_hvp_fisher_equal_unsharded(sharded_setup, llama_curv, data):
    cfg, p1, p8, mesh = sharded_setup
    ft, safe = _sft_batches(data["tok"])
    v, out1 = llama_curv
    v8 = jax.device_put(v, M.param_shardings(cfg, mesh))
    out8 = _curv(M.lm_problem(cfg, p8, ft, safe), v8)
    assert out8[1]["layers"]["q"].sharding.spec[1] == "fsdp"  # the gradient stays sharded like the params
    for a, b in zip(out8, out1):
        assert _rel(a, b) <= 1e-12
    assert _rel(out1[3], v) > 0


def test_flow_taylor_and_aic_measure_run(ckpts, sharded_setup, llama_curv, data):
    """aic.measure end to end (its flow_taylor with method="jvp", nested forward mode through lax.scan and
    jax.checkpoint; the empirical Fisher of the safe completions, exact from the Gram matrix): on the full
    parameters of the Llama model, where ‖g‖ and ‖Hg‖ from the Taylor coefficients c₁ = −g, c₂ = Hg/2 equal
    reverse-mode ∇L and curvature.hvp; and on LoRA adapters of the Qwen3 model (masked curvature)."""
    cfg, params, _, _ = sharded_setup
    ft, safe = _sft_batches(data["tok"])
    prob = M.lm_problem(cfg, params, ft, safe, name="llama")
    rep = aic.measure(prob, 2, fisher=aic.EmpiricalFisher(method="gram"), taylor_method="jvp")
    _, g, hg, _ = llama_curv[1]
    nrm = lambda t: float(jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(t))))
    np.testing.assert_allclose([rep.g_norm, rep.hg_norm], [nrm(g), nrm(hg)], rtol=1e-10)
    assert rep.n == M.llama.param_count(params) and np.all(np.isfinite(rep.eigvals)) and rep.eigvals[0] > 0
    assert 0 < rep.eps <= rep.g_norm * (1 + 1e-9) and rep.gamma_F > 0 and np.isfinite(rep.c3_F)
    qcfg, qparams = M.load_pretrained(ckpts["qwen3"][0], dtype="float64")
    lcfg = M.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "up"))
    ad = M.init_lora(qparams, lcfg, jax.random.PRNGKey(0))
    ad = {t: {"A": ab["A"], "B": 0.05 * jnp.ones_like(ab["B"])} for t, ab in ad.items()}
    lp = M.lm_problem(qcfg, M.lora_tree(qparams, ad), ft, safe, lora=lcfg, name="qwen3-lora")
    rl = aic.measure(lp, 2, fisher=aic.EmpiricalFisher(method="gram"), taylor_method="jvp")
    assert rl.n == sum(int(x.size) for x in jax.tree_util.tree_leaves(ad))
    assert np.all(np.isfinite(rl.eigvals)) and rl.eigvals[0] > 0 and rl.gamma_F > 0 and rl.eps <= rl.g_norm


# --------------------------------------------------------------------------- memory estimates


MEM_CFG = M.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, tie_word_embeddings=True)


def _xla_peak(f, *args, donate=()):
    m = jax.jit(f, donate_argnums=donate).lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def test_residual_bytes_closed_form():
    S = jax.ShapeDtypeStruct
    assert memory.residual_bytes(jnp.sin, S((100,), jnp.float32)) == 400  # cos x
    assert memory.residual_bytes(lambda x, w: x @ w, S((8, 5), jnp.float32), S((5, 3), jnp.float32)) == 0  # inputs


def test_memory_estimate_matches_xla():
    """estimate_memory against XLA's buffer assignment (memory_analysis of the compiled program) on a small
    float32 configuration where activations and parameters are comparable: within 25 % for every operation,
    policy, LoRA and an 8-device FSDP layout."""
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    B, T, K = 8, 128, 64
    tok = np.random.default_rng(0).integers(0, MEM_CFG.vocab_size, (B, T)).astype(np.int32)
    batch = jax.tree_util.tree_map(jnp.asarray, M.make_batch([list(t[:T - K]) for t in tok],
                                                             [list(t[T - K:]) for t in tok]))
    params = llama.init_params(MEM_CFG, jax.random.PRNGKey(0))
    ratios = {}

    def check(name, cfg, op, measured, **kw):
        est = memory.estimate_memory(cfg, op, batch=B, seq_len=T, dtype="float32", completion_len=K, **kw)
        ratios[name] = est.peak / measured

    full, none, dots = (dataclasses.replace(MEM_CFG, remat=r) for r in ("full", "none", "dots"))
    pf, pn, pd = (M.lm_problem(c, params, batch, batch) for c in (full, none, dots))
    check("grad/full", full, "grad", _xla_peak(lambda p, b: jax.grad(pf.loss_fn)(p, b), params, batch))
    check("grad/none", none, "grad", _xla_peak(lambda p, b: jax.grad(pn.loss_fn)(p, b), params, batch))
    check("hvp/dots", dots, "hvp",
          _xla_peak(lambda p, v, b: curvature.hvp(pd.loss_fn, p, v, b), params, params, batch))
    check("fisher_vp/full", full, "fisher_vp",
          _xla_peak(lambda p, v, b: curvature.fisher_vp(pf.logits_fn, p, v, b), params, params, batch))
    check("per_example_grads/full", full, "per_example_grads",
          _xla_peak(lambda p, b: curvature.per_example_grads(pf.logprob_fn, p, b), params, batch), chunk=B)
    opt = optax.adam(1e-3)

    def step(p, s, b):
        u, s = opt.update(jax.grad(pf.loss_fn)(p, b), s, p)
        return optax.apply_updates(p, u), s

    check("adam/full", full, "adam", _xla_peak(step, params, opt.init(params), batch, donate=(0, 1)))
    lcfg = M.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    tree = M.lora_tree(params, M.init_lora(params, lcfg, jax.random.PRNGKey(1)))
    pl = M.lm_problem(full, tree, batch, batch, lora=lcfg)
    check("hvp/lora", full, "hvp", _xla_peak(lambda p, v, b: curvature.hvp(pl.loss_fn, p, v, b, pl.mask),
                                             tree, tree, batch), lora=lcfg)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    fs = M.fsdp_config(full, mesh)
    p8 = jax.device_put(params, M.param_shardings(full, mesh))
    b8 = jax.device_put(batch, NamedSharding(mesh, P("fsdp")))
    p8f = M.lm_problem(fs, p8, b8, b8)
    check("grad/fsdp8", fs, "grad", _xla_peak(lambda p, b: jax.grad(p8f.loss_fn)(p, b), p8, b8), devices=8)
    bad = {k: round(v, 3) for k, v in ratios.items() if not 0.75 <= v <= 1.25}
    assert not bad, ratios
    with pytest.raises(ValueError, match="op"):
        memory.estimate_memory(MEM_CFG, "backprop", batch=1, seq_len=8)
