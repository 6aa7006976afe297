"""Smoke test of the benchmark scripts (benchmarks/): they import, run in --quick mode on tiny models
and write valid JSON. No timing is asserted (timings on a shared CI machine are not a test)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_run_quick_writes_json(tmp_path):
    from benchmarks import run

    out = tmp_path / "results.json"
    res = run.main(["--quick", "--sections", "curvature,sweep", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert data["environment"]["jax"] == jax.__version__
    assert data["environment"]["cpu_count"] >= 1
    cur = data["curvature"]["mlp"]
    for op in ("hvp", "linearized_hvp_setup", "fisher_vp", "third_order"):
        assert math.isfinite(cur["ratio_to_grad"][op]) and cur["ratio_to_grad"][op] > 0
    # one matvec of the reused linearisation is a difference of two timings (K - 1 = 63 extra matvecs in
    # --quick): it must resolve to a positive cost
    lin = cur["ratio_to_grad"]["linearized_hvp"]
    assert lin is not None and math.isfinite(lin) and lin > 0
    # XLA's flop counts: an HVP costs more than a gradient, and one linearised matvec less than an HVP
    fl = cur["flops_ratio_to_grad"]
    assert fl["hvp"] > 1 and 0 < fl["linearized_hvp"] < fl["hvp"] and fl["third_order"] > fl["hvp"]
    assert cur["time_per_flop"]["hvp"] == pytest.approx(cur["ratio_to_grad"]["hvp"] / fl["hvp"], rel=1e-12)
    for op in ("hvp", "third_order", "linearized_hvp"):
        assert cur["peak_memory_ratio_to_grad"][op] > 0
    assert cur["dtype"] == ["float32"]  # the timed operators really run in float32
    sw = data["sweep"]
    # the vmapped (and, with several host devices, the sharded) sweep computes the same flows as the loop
    assert sw["max_rel_diff_vs_loop"] <= 1e-5 and sw["bounded_fraction"] >= 0.5
    assert sw["displacement_scale"] > 0
    # the test session has 8 host devices (conftest): the 4x4 quick grid is also run sharded over them
    assert sw["devices"] == 8 and math.isfinite(sw["speedup_sharded"]) and sw["speedup_sharded"] > 0
    quantities = [r["quantity"] for r in data["table"]]
    assert any(q.startswith("hvp: time") for q in quantities)
    assert any(q.startswith("third_order: peak memory") for q in quantities)
    assert res["seconds"]["total"] > 0
    assert set(run.DEFAULT_SECTIONS) <= set(run.SECTIONS)
    with pytest.raises(SystemExit) as e:
        run.main(["--sections", "curvature,nope", "--out", str(tmp_path / "never.json")])
    assert e.value.code == 2 and not (tmp_path / "never.json").exists()


def test_per_matvec_ratio():
    from benchmarks.curvature import per_matvec_ratio

    # t(K) = setup + K * matvec, grad = 2: one matvec = 0.5 grad whatever the setup cost
    t1 = [1.0 + 1.0, 3.0 + 1.0, 2.0 + 1.0]
    t5 = [1.0 + 5.0, 3.0 + 5.0, 2.0 + 5.0]
    assert per_matvec_ratio(t1, t5, [2.0, 2.0, 2.0], 5) == pytest.approx(0.5, rel=1e-12)
    # noise larger than the extra matvecs: unresolved, not a negative cost
    assert per_matvec_ratio([3.0, 3.0], [2.5, 2.9], [1.0, 1.0], 3) is None
    with pytest.raises(ValueError, match="K >= 2"):
        per_matvec_ratio([1.0], [1.0], [1.0], 1)


def test_benchmark_problems():
    from alignment_geom.problem import Problem
    from benchmarks.models import get_model, llama_config, mlp_problem, n_params, small_variant

    mlp = mlp_problem()
    assert isinstance(mlp, Problem) and mlp.name == "mlp" and n_params(mlp.params) == 1_055_242
    tf = get_model("transformer")
    cfg = llama_config(tf)
    assert isinstance(tf, Problem) and tf.name == "transformer" and cfg.num_layers == 2 and cfg.remat != "none"
    assert n_params(tf.params) == 590_464 and tf.batch["tokens"].shape == (32, 33)
    assert float(tf.batch["weights"].sum()) == 32 * 32
    with pytest.raises(ValueError, match="unknown model"):
        small_variant("resnet")


def test_torch_peers_agree():
    """The PyTorch peers compute the same loss and H·v as alignment_geom: the MLP's hand-written mirror in
    float64 (1e-12 / 1e-9), transformers' LlamaForCausalLM on the small Llama's weights in float32 (transformers
    runs RMSNorm and softmax in float32 whatever the weights' dtype): loss to 1e-5, H·v to 1e-4."""
    torch = pytest.importorskip("torch")
    from alignment_geom import curvature as C
    from benchmarks.models import small_variant
    from benchmarks.torch_peer import build_torch_module, jax_flat, torch_batch, torch_hvp, torch_leaves

    for name, dt, tol_loss, tol_hv in (("mlp", "float64", 1e-12, 1e-9), ("transformer", "float32", 1e-5, 1e-4)):
        model = small_variant(name, dtype=getattr(jnp, dt))
        module = build_torch_module(model, dt)
        tb = {k: (v.to(getattr(torch, dt)) if torch.is_floating_point(v) else v) for k, v in torch_batch(model).items()}
        leaves, treedef = jax.tree_util.tree_flatten(model.params)
        rng = np.random.default_rng(0)
        v_np = [rng.standard_normal(x.shape) for x in leaves]
        v = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, dt) for x in v_np])
        hv_t = jax_flat(module, torch_hvp(module, tb, torch_leaves(module, v_np, getattr(torch, dt))))
        hv_j = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(
            C.hvp(model.loss_fn, model.params, v, model.batch))])
        np.testing.assert_allclose(float(module.loss(tb).detach()), float(model.loss_fn(model.params, model.batch)),
                                   rtol=tol_loss)
        assert np.linalg.norm(hv_t - hv_j) <= tol_hv * np.linalg.norm(hv_j), name


def test_sweep_child_process_one_host_device_per_core():
    # what `python -m benchmarks.run` does on a 1-device CPU backend: re-run the sweep in a child
    # process with N forced host devices, the loop and vmapped on one, sharded over all N
    from benchmarks import sweep

    res = sweep.run_subprocess(2, quick=True, reps=1, log=lambda *_: None)
    assert "--xla_force_host_platform_device_count=2" in res["xla_flags"]
    assert res["devices"] == 2 and res["n_configs"] == 16
    assert res["max_rel_diff_vs_loop"] <= 1e-5 and res["bounded_fraction"] >= 0.5
    assert math.isfinite(res["speedup_sharded"]) and math.isfinite(res["speedup_one_device"])


def test_llm_benchmark_quick(tmp_path):
    """benchmarks.llm --quick runs both frameworks on the same tiny Llama: their HVPs agree (float32), and every
    ratio is a positive number (the timings themselves are not asserted)."""
    from benchmarks import llm

    out = llm.main(["--quick", "--json", str(tmp_path / "llm.json")])
    assert out["hvp_rel_diff"] <= 1e-4 and out["loss_rel_diff"] <= 1e-5
    for k in ("fwd_bwd_speedup_full", "fwd_bwd_speedup_none", "hvp_speedup"):
        assert math.isfinite(out[k]) and out[k] > 0
    assert json.loads((tmp_path / "llm.json").read_text())["n_params"] == out["n_params"]
    table = llm.memory_table()
    assert table.count("| Qwen3-1.7B |") == table.count("| Llama-3.2-3B |") > 0


def test_table_rows_arpack_side_by_side():
    """The side-by-side with ARPACK reaches the results table: a solver passes only with time ≤ 0.7× and
    matvecs ≤ ARPACK's."""
    from benchmarks import run

    sbs = {"arpack_eigsh": {"num_matvecs": 154, "time_ratio_to_arpack": 1.0, "matvec_ratio_to_arpack": 1.0,
                            "max_residual": 2e-7},
           "lanczos": {"num_matvecs": 145, "time_ratio_to_arpack": 1.36, "matvec_ratio_to_arpack": 0.94,
                       "max_residual": 7e-7},
           "lanczos_gram_side": {"num_matvecs": 149, "time_ratio_to_arpack": 0.51, "matvec_ratio_to_arpack": 0.97,
                                 "max_residual": 4e-7},
           "too_many_matvecs": {"num_matvecs": 200, "time_ratio_to_arpack": 0.5, "matvec_ratio_to_arpack": 1.3,
                                "max_residual": 4e-7}}
    rows = run.table_rows({"spectral": {"targets": {}, "arpack_side_by_side": sbs}})
    verdict = {r[1].split(":")[0]: r[4] for r in rows if "ARPACK" in r[1]}
    assert verdict == {"lanczos": False, "lanczos_gram_side": True, "too_many_matvecs": False}
