"""The two benchmark problems, as :class:`alignment_geom.problem.Problem` values (the library's own type).

* ``mlp``: a tanh MLP 512 → 1024 → 512 → 10 (1,055,242 parameters), softmax cross-entropy on a batch of
  m = 512 examples (Gaussian inputs, random labels); mirrored by hand in PyTorch (benchmarks/torch_peer.py).
* ``transformer``: a small Llama (``alignment_geom.models.llama``: 2 layers under ``lax.scan`` with per-block
  remat "dots", hidden 128, 4 heads of 32, SwiGLU MLP 512, vocab 256, untied output embedding; 590,464 parameters),
  next-token cross-entropy (``models.sft_loss``) on 32 random sequences of 33 tokens (32 × 32 = 1024
  predicted positions). Its PyTorch peer is transformers' ``LlamaForCausalLM`` on the same weights
  (``models.save_pretrained`` → ``from_pretrained``).

Each Problem has L = ``loss_fn(params, batch)``, the policy ``logits_fn(params, inputs) -> (..., C)`` (for the
Fisher F; the transformer's are the completion logits (B, K, V)), and the per-example log-likelihoods
``logprob_fn(params, safety_batch) -> (m,)`` (for the empirical Fisher F̂), all on the same batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import models as M
from alignment_geom.problem import Problem
from alignment_geom.testing import ce_logprob

__all__ = ["MLP_SIZES", "MLP_BATCH", "TF_CONFIG", "TF_CONTEXT", "TF_BATCH", "MODELS", "n_params", "cast",
           "mlp_logits", "mlp_problem", "transformer_problem", "llama_config", "small_variant", "get_model"]

MLP_SIZES = (512, 1024, 512, 10)
MLP_BATCH = 512

TF_CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=32, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=64,
                 remat="dots")
TF_CONTEXT = 32
TF_BATCH = 32
TF_QUICK = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=8, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=16, remat="dots")


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


def mlp_logprob(params, batch):
    """log π(yᵢ | xᵢ), shape (m,)."""
    return ce_logprob(mlp_logits(params, batch["x"]), batch["y"])


def mlp_loss(params, batch):
    """L = −mean log π(yᵢ | xᵢ)."""
    return -jnp.mean(mlp_logprob(params, batch))


def mlp_problem(seed: int = 0, sizes=MLP_SIZES, m: int = MLP_BATCH, dtype=jnp.float32) -> Problem:
    """The ~1M-parameter tanh MLP (LeCun-normal weights) with softmax cross-entropy on m examples."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"l{i}"] = {"W": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), dtype),
                           "b": jnp.asarray(0.1 * rng.standard_normal((b,)), dtype)}
    x = jnp.asarray(rng.standard_normal((m, sizes[0])), dtype)
    y = jnp.asarray(rng.integers(0, sizes[-1], (m,)), jnp.int32)
    batch = {"x": x, "y": y}
    return Problem(params=params, loss_fn=mlp_loss, batch=batch, logits_fn=mlp_logits, inputs=x,
                   logprob_fn=mlp_logprob, safety_batch=batch, name="mlp")


# --------------------------------------------------------------------------- small Llama


def transformer_problem(seed: int = 0, m: int = TF_BATCH, context: int = TF_CONTEXT, dtype=jnp.float32,
                        **config) -> Problem:
    """The small Llama (``TF_CONFIG``, overridden by ``config``) on m random sequences of context + 1 tokens:
    the first token is the prompt, the other ``context`` are the completion, so L is the mean next-token
    cross-entropy over m × context positions (``models.lm_problem``, safety batch = the same batch)."""
    cfg = M.LlamaConfig(**{**TF_CONFIG, **config})
    k_init, k_tok = jax.random.split(jax.random.PRNGKey(seed))
    params = M.init_llama(cfg, k_init, dtype=jnp.dtype(dtype), std=0.05)
    tok = np.asarray(jax.random.randint(k_tok, (m, context + 1), 0, cfg.vocab_size, dtype=jnp.int32))
    batch = M.make_batch([[int(t[0])] for t in tok], [list(t[1:]) for t in tok])
    return M.lm_problem(cfg, params, batch, batch, name="transformer")


def llama_config(problem: Problem) -> M.LlamaConfig:
    """The LlamaConfig of a transformer Problem (carried by its loss function, a ``models.LMFunction``)."""
    return problem.loss_fn.cfg


MODELS = {"mlp": mlp_problem, "transformer": transformer_problem}


def small_variant(name: str, dtype=jnp.float32) -> Problem:
    """Tiny versions of the same architectures (for --quick runs and smoke tests)."""
    if name == "mlp":
        return mlp_problem(0, sizes=(16, 32, 16, 10), m=32, dtype=dtype)
    if name == "transformer":
        return transformer_problem(0, m=2, context=6, dtype=dtype, **TF_QUICK)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")


def get_model(name: str, quick: bool = False, dtype=jnp.float32) -> Problem:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return small_variant(name, dtype) if quick else MODELS[name](dtype=dtype)
