"""The two benchmark problems, defined once for JAX (and mirrored exactly in benchmarks/torch_peer.py).

* ``mlp``: a tanh MLP 512 → 1024 → 512 → 10 (1,055,242 parameters), softmax cross-entropy on a
  batch of m = 512 examples (Gaussian inputs, random labels).
* ``transformer``: a small pre-LayerNorm causal transformer LM in Flax (2 layers, width 128,
  4 heads, MLP width 512, vocab 64, context 32; 417,344 parameters), next-token cross-entropy on
  32 random sequences of 33 tokens (32 × 32 = 1024 predicted positions).

Every problem is a :class:`BenchModel` with the fields of ``alignment_geom.testing.TinyModel``:
``loss_fn(params, batch)`` (the fine-tuning loss L), ``logits_fn(params, inputs) -> (..., C)`` (the
policy, for the Fisher F), ``inputs`` (the Fisher's inputs: the same batch's inputs),
``logprob_fn(params, batch) -> (m,)`` (per-example log π(y|x), for the empirical Fisher).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.testing import ce_logprob

MLP_SIZES = (512, 1024, 512, 10)
MLP_BATCH = 512

TF_VOCAB = 64
TF_CONTEXT = 32
TF_WIDTH = 128
TF_HEADS = 4
TF_LAYERS = 2
TF_BATCH = 32
LN_EPS = 1e-5


class BenchModel(NamedTuple):
    name: str
    params: Any
    loss_fn: Callable
    batch: Any
    logits_fn: Callable
    inputs: Any
    logprob_fn: Callable
    config: Any = None  # architecture hyper-parameters (for the PyTorch mirror)


def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def cast(tree, dtype):
    """Cast the floating leaves of a pytree to ``dtype`` (integer leaves, e.g. tokens, untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------- tanh MLP


def mlp_logits(params, x):
    """z = W_L tanh(… tanh(x W_1 + b_1) …) + b_L; params = {"l0": {"W", "b"}, "l1": …}."""
    h = x
    n = len(params)
    for i in range(n):
        layer = params[f"l{i}"]
        h = h @ layer["W"] + layer["b"]
        if i < n - 1:
            h = jnp.tanh(h)
    return h


def mlp_model(seed: int = 0, sizes=MLP_SIZES, m: int = MLP_BATCH, dtype=jnp.float32) -> BenchModel:
    """The ~1M-parameter tanh MLP (LeCun-normal weights) with softmax cross-entropy on m examples."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"l{i}"] = {"W": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), dtype),
                           "b": jnp.asarray(0.1 * rng.standard_normal((b,)), dtype)}
    x = jnp.asarray(rng.standard_normal((m, sizes[0])), dtype)
    y = jnp.asarray(rng.integers(0, sizes[-1], (m,)), jnp.int32)

    def loss_fn(p, batch):
        return -jnp.mean(ce_logprob(mlp_logits(p, batch["x"]), batch["y"]))

    def logprob_fn(p, batch):
        return ce_logprob(mlp_logits(p, batch["x"]), batch["y"])

    return BenchModel("mlp", params, loss_fn, {"x": x, "y": y}, mlp_logits, x, logprob_fn, {"sizes": tuple(sizes)})


# --------------------------------------------------------------------------- small transformer (Flax)


def _transformer_module(vocab=TF_VOCAB, context=TF_CONTEXT, width=TF_WIDTH, heads=TF_HEADS, layers=TF_LAYERS):
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            T = h.shape[-2]
            dh = width // heads
            x = nn.LayerNorm(epsilon=LN_EPS, name="ln1")(h)
            qkv = nn.Dense(3 * width, name="qkv")(x)
            q, k, v = jnp.split(qkv, 3, axis=-1)
            split = lambda t: t.reshape(t.shape[:-1] + (heads, dh))  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            att = jnp.einsum("...qhd,...khd->...hqk", q, k) * float(dh) ** -0.5  # weak type: stays float32
            causal = jnp.tril(jnp.ones((T, T), bool))
            att = jnp.where(causal, att, jnp.asarray(-1e9, att.dtype))
            o = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(att, axis=-1), v)
            h = h + nn.Dense(width, name="proj")(o.reshape(o.shape[:-2] + (width,)))
            x = nn.LayerNorm(epsilon=LN_EPS, name="ln2")(h)
            x = nn.Dense(width, name="fc2")(nn.gelu(nn.Dense(4 * width, name="fc1")(x), approximate=True))
            return h + x

    class CausalLM(nn.Module):
        """Token + learned position embeddings, pre-LN blocks, final LayerNorm, linear readout."""

        @nn.compact
        def __call__(self, tokens):
            T = tokens.shape[-1]
            if T > context:
                raise ValueError(f"sequence length {T} exceeds the context {context}")
            emb = self.param("embed", nn.initializers.normal(0.02), (vocab, width))
            pos = self.param("pos", nn.initializers.normal(0.02), (context, width))
            h = emb[tokens] + pos[:T]
            for i in range(layers):
                h = Block(name=f"block{i}")(h)
            h = nn.LayerNorm(epsilon=LN_EPS, name="ln_f")(h)
            return nn.Dense(vocab, name="head")(h)

    return CausalLM()


def transformer_model(seed: int = 0, m: int = TF_BATCH, dtype=jnp.float32, vocab=TF_VOCAB, context=TF_CONTEXT,
                      width=TF_WIDTH, heads=TF_HEADS, layers=TF_LAYERS) -> BenchModel:
    """The small causal transformer LM; loss = mean next-token cross-entropy over m × context tokens."""
    module = _transformer_module(vocab, context, width, heads, layers)
    k_init, k_tok = jax.random.split(jax.random.PRNGKey(seed))
    tokens = jax.random.randint(k_tok, (m, context + 1), 0, vocab, dtype=jnp.int32)
    params = cast(module.init(k_init, tokens[:, :-1])["params"], dtype)

    def logits_fn(p, toks):
        return module.apply({"params": p}, toks)

    def loss_fn(p, batch):
        t = batch["tokens"]
        return -jnp.mean(ce_logprob(logits_fn(p, t[:, :-1]), t[:, 1:]))

    def logprob_fn(p, batch):
        t = batch["tokens"]
        return jnp.sum(ce_logprob(logits_fn(p, t[:, :-1]), t[:, 1:]), axis=-1)

    config = dict(vocab=vocab, context=context, width=width, heads=heads, layers=layers)
    return BenchModel("transformer", params, loss_fn, {"tokens": tokens}, logits_fn, tokens[:, :-1], logprob_fn,
                      config)


MODELS = {"mlp": mlp_model, "transformer": transformer_model}


def small_variant(name: str, dtype=jnp.float32) -> BenchModel:
    """Tiny versions of the same architectures (for --quick runs and smoke tests)."""
    if name == "mlp":
        return mlp_model(0, sizes=(16, 32, 16, 10), m=32, dtype=dtype)
    if name == "transformer":
        return transformer_model(0, m=2, dtype=dtype, vocab=8, context=6, width=16, heads=2, layers=1)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")


def get_model(name: str, quick: bool = False, dtype=jnp.float32) -> BenchModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return small_variant(name, dtype) if quick else MODELS[name](dtype=dtype)
