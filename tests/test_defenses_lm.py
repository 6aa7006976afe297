"""Tests of the defences study on the Section-7 model: the defended fine-tuning loop against hand-written SGD and
the static projection's invariant (float64, a tiny Llama model), the study at smoke scale."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from alignment_geom import harness, studies
from alignment_geom.data import synthetic as D
from alignment_geom.models import llama, lora
from alignment_geom.models import objectives as O
from alignment_geom.studies import defenses_lm as DL
from alignment_geom.studies import lm_table1 as T

TINY = llama.LlamaConfig(vocab_size=D.VOCAB_SIZE, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=4, tie_word_embeddings=True, max_position_embeddings=24,
                         eos_token_id=(D.EOS,), pad_token_id=D.PAD, remat="none")
LCFG = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))


@pytest.fixture(scope="module")
def setup():
    theta = llama.init_params(TINY, jax.random.PRNGKey(0), dtype="float64", std=0.5)
    s = D.make_dataset("harmful", 4, 0, context=24)
    safety = {k: jnp.asarray(v) for k, v in D.lm_batch({**s, "tokens": s["tokens"][:, :13]}, 4).items()}
    data = {k: jnp.asarray(v) for k, v in D.lm_batch(D.make_dataset("dolly", 16, 0, context=24)).items()}
    perms = DL.perms_of(jax.random.PRNGKey(1), 16, 4, 1)
    return theta, safety, data, perms


def _run(setup, name, method, start, sub, lr=0.05):
    theta, safety, data, perms = setup
    return DL.finetune(start, sub.basis, sub.eigvals, sub.residuals, safety, data, data, perms, name=name, opts=(),
                       method=method, lcfg=LCFG, cfg=TINY, lr=lr, optimizer="sgd")


def test_no_defense_is_plain_sgd_and_static_projection_stays_orthogonal(setup):
    """none + sgd = θ ← θ − η ∇L(θ; batch) written by hand; static projection + sgd: PΔθ = 0 exactly."""
    theta, safety, data, perms = setup
    loss = jax.jit(jax.value_and_grad(T.lm_fns(TINY)[0]))
    sub = DL.subspace_at(T.lm_fns(TINY)[1], theta, safety, 3, 20, jax.random.PRNGKey(2))
    p, losses = _run(setup, "none", "full", theta, sub)
    ref, ls = theta, []
    for idx in np.asarray(perms):
        lv, g = loss(ref, {k: v[idx] for k, v in data.items()})
        ls.append(float(lv))
        ref = jax.tree_util.tree_map(lambda a, b: a - 0.05 * b, ref, g)
    np.testing.assert_allclose(ravel_pytree(p)[0], ravel_pytree(ref)[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(losses, ls, rtol=1e-10)
    ps, _ = _run(setup, "static_projection", "full", theta, sub)
    delta = ravel_pytree(ps)[0] - ravel_pytree(theta)[0]
    B = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(sub.basis))  # (d, n) orthonormal rows
    np.testing.assert_allclose(B @ B.T, np.eye(3), atol=1e-10)
    assert np.linalg.norm(B @ delta) <= 1e-10 * np.linalg.norm(delta)
    assert np.linalg.norm(delta) > 1e-3


def test_lora_defended_training_changes_only_adapters(setup):
    theta, safety, data, perms = setup
    tree = lora.lora_tree(theta, lora.init_lora(theta, LCFG, jax.random.PRNGKey(3)))
    sub = DL.subspace_at(O.LMFunction(TINY, "completion_logits", LCFG, freeze_base=True), tree, safety, 2, 12,
                         jax.random.PRNGKey(4))
    for name in ("fisher_penalty",):
        out, losses = _run(setup, name, "lora", tree, sub)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(out["base"]),
                                                         jax.tree_util.tree_leaves(theta)))
        assert not np.array_equal(out["lora"]["q"]["B"], tree["lora"]["q"]["B"])
        assert np.all(np.isfinite(losses))


def _config(arg):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return harness.load_config(os.path.join(root, "configs", "defenses_lm.py") + ":" + arg)


def test_study_smoke(tmp_path):
    c = _config("smoke")
    res = studies.run(c, str(tmp_path / "defenses_lm"))
    assert len(res["rows"]) == 2 * len(c.defenses) * len(c.tasks)
    for r in res["rows"]:
        assert 1 <= r["hs_after"] <= 5 and 0 <= r["acc_after"] <= 1 and r["du"] >= 0 and r["step_seconds"] > 0
    for m in ("full", "lora"):
        s = res["summary"][m]
        assert set(s) == set(c.defenses) and s["none"]["time_ratio"] == 1.0 and s["none"]["hs_vs_none"] == 0.0
        rr = [r for r in res["rows"] if r["method"] == m and r["defense"] == c.claim_defense]
        assert s[c.claim_defense]["hs_after"] == pytest.approx(np.mean([r["hs_after"] for r in rr]))
    cl = res["claim"]
    assert cl["measured"] == pytest.approx(res["summary"]["full"][c.claim_defense]["hs_vs_none"])
    assert os.path.exists(tmp_path / "defenses_lm" / "defenses_lm.png")
    assert os.path.exists(tmp_path / "defenses_lm" / "defenses_lm.md")
    assert studies.get_study("defenses_lm") is DL and "defenses_lm" in studies.MAIN_JOB


def test_config_validation():
    c = _config("smoke")
    c.defenses = ("fisher_penalty", "none")
    with pytest.raises(harness.ConfigError, match="defenses"):
        DL.validate(c)
    c = _config("smoke")
    c.claim_defense = "none"
    with pytest.raises(harness.ConfigError, match="claim_defense"):
        DL.validate(c)
