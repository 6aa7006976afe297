"""Smoke-scale runs of the figures (alignment_geom.studies, float64, 8 forced host devices). Each test checks the
figure's numbers against the theory's constants and oracles that share no code with the study (the landscape's
closed-form a₄, dense numpy Fishers and angles); the study's own verdict (claim.agree, the summary table's input)
is asserted last, never alone."""
import json
import os

import jax
import numpy as np
import pytest

from alignment_geom import harness, studies
from alignment_geom import landscapes as L
from alignment_geom.studies import _theory as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg="smoke"):
    return harness.load_config(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


def _run(name, tmp_path, arg="smoke", **overrides):
    config = _config(name, arg)
    for k, v in overrides.items():
        setattr(config, k, v)
    wd = str(tmp_path / name)
    res = studies.run(config, wd)
    for f in ("config.json", "env.json", "results.json", f"{name}.png", f"{name}.pdf"):
        assert os.path.getsize(os.path.join(wd, f)) > 0, f
    on_disk = json.load(open(os.path.join(wd, "results.json")))
    assert on_disk["claim"] == res["claim"]
    return res


def _closed_form_a4(name, axis, values):
    """The landscape's closed-form a₄ (make_landscape's info) at each sweep value: no Taylor-mode code involved."""
    config = _config(name)
    return np.array([L.make_landscape(**ex.landscape_kwargs(config, **{axis: float(v)})).info["a4"] for v in values])


def test_quartic_onset_slope_4_and_c4(tmp_path):
    r = _run("quartic_onset", tmp_path)
    assert abs(r["slope"] - 4) <= 0.1
    # the landscape's closed form a₄ = ⅛ Σ λ_i A_i² (exact at ε = 0; ε = 1e-3 moves it by O(ε²)/a₄ ≈ 1e-7)
    a4 = r["landscape_info"]["a4"]
    assert abs(r["c4_fit"] - a4) <= 0.02 * a4
    np.testing.assert_allclose(r["c4_exact"], a4, rtol=1e-6)
    lo, hi = r["window"]
    assert 0 < lo < hi and r["window_decades"] >= 1.0
    # the two bounds: γ_F ≥ √λ γ_E so the F-bound is the tighter one, and here it is the leading a_4 term
    assert r["c4_bound_E"] <= r["c4_bound_F"] * (1 + 1e-12)
    assert abs(r["c4_bound_F"] - r["c4_exact"]) <= 1e-3 * r["c4_exact"]
    assert r["gamma_F"] >= np.sqrt(r["lam"]) * r["gamma_E"] * (1 - 1e-12)
    np.testing.assert_allclose([r["lam"], r["gamma_E"], r["eps"]], [10.0, 0.3, 1e-3], rtol=1e-10)
    # aic.measure (Lanczos, subspace found from scratch) agrees with the landscape's exact eigenbasis
    for k in ("lam", "gamma_F", "gamma_E", "eps", "eps_F"):
        np.testing.assert_allclose(r["aic"][k], r["aic_known_basis"][k], rtol=1e-8, err_msg=k)
    assert set(r) >= {"window", "slope", "c4_fit", "c4_exact", "c4_bound_F", "c4_bound_E", "lam", "gamma_F",
                      "gamma_E", "eps"}
    assert r["claim"]["agree"]


def test_sharpness_sweep_exponent_1(tmp_path):
    r = _run("sharpness_sweep", tmp_path)
    assert abs(r["exponent"] - 1) <= 0.05
    assert r["exponent_ci"][0] <= r["exponent"] <= r["exponent_ci"][1]
    assert len(r["c4_fit"]) == len(r["lam"]) == 4
    a4 = _closed_form_a4("sharpness_sweep", "lam", r["lam"])
    np.testing.assert_allclose(r["c4_fit"], a4, rtol=0.02)
    np.testing.assert_allclose(r["c4_exact"], a4, rtol=1e-6)
    np.testing.assert_allclose(r["gamma_E"], 0.3, rtol=1e-12)  # γ_E held fixed
    assert r["claim"]["agree"]


def test_coupling_sweep_exponent_2(tmp_path):
    r = _run("coupling_sweep", tmp_path)
    assert abs(r["exponent"] - 2) <= 0.05
    a4 = _closed_form_a4("coupling_sweep", "gamma", r["gamma"])
    np.testing.assert_allclose(r["c4_fit"], a4, rtol=0.02)
    np.testing.assert_allclose(r["c4_exact"], a4, rtol=1e-6)
    assert r["claim"]["agree"]


def test_collapse_time_exponent_minus_quarter(tmp_path):
    r = _run("collapse_time", tmp_path)
    assert abs(r["exponent"] + 0.25) <= 0.02
    assert all(r["reached"]) and len(r["t_star"]) == 9
    np.testing.assert_allclose(r["t_star"], r["t_star_taylor"], rtol=0.03)
    assert r["claim"]["agree"]


def test_drift_quadratic_above_bound(tmp_path):
    r = _run("drift", tmp_path)
    assert abs(r["slope"] - 2) <= 0.05
    assert r["min_ratio_in_window"] >= 0.98
    # small t: the ε term dominates (slope 1)
    assert abs(r["local_slope"][1] - 1) <= 0.1
    assert r["claim"]["agree"]


def test_orthogonality_illusion_first_order_orders_below(tmp_path):
    r = _run("orthogonality_illusion", tmp_path)
    assert r["ratio_at_window_end"] >= 100          # two orders of magnitude
    assert r["ratio_at_window_start"] > 1
    pr = np.asarray(r["proj_ratio"])
    # at t = ts[0] the path is δ = −g t + Hg t²/2 + O(t³): ‖Pδ‖/‖δ‖ from dense jax.hessian and the exact basis
    ls, _ = ex.landscape_setup(_config("orthogonality_illusion"))
    g = np.asarray(jax.grad(ls.loss_fn)(ls.params, ls.batch)["theta"])
    H = np.asarray(jax.hessian(lambda th: ls.loss_fn({"theta": th}, ls.batch))(ls.params["theta"]))
    t0 = r["ts"][0]
    delta = -g * t0 + H @ g * t0 ** 2 / 2
    Pb = np.asarray(ls.basis["theta"])
    np.testing.assert_allclose(pr[0], np.linalg.norm(Pb @ delta) / np.linalg.norm(delta), rtol=1e-3)
    np.testing.assert_allclose(r["proj_ratio_t0"], np.linalg.norm(Pb @ g) / np.linalg.norm(g), rtol=1e-12)
    assert pr[-1] > 10 * pr[0]                                       # and grows
    assert r["claim"]["agree"]


def test_projection_defense_static_fails_dynamic_holds(tmp_path):
    r = _run("projection_defense", tmp_path)
    assert abs(r["slope_static"] - 4) <= 0.1
    assert r["ratio_static_to_none"] >= 0.1
    assert r["ratio_dynamic_to_none"] <= 1e-2
    assert r["claim"]["agree"]


def test_gd_vs_flow(tmp_path):
    r = _run("gd_vs_flow", tmp_path)
    s = r["slope_in_window"]
    assert abs(s["flow"] - 4) <= 0.1 and abs(s["GD η=0.003"] - 4) <= 0.1
    assert all(v < 3.0 for v in r["slope_small_t"].values())   # SGD and Adam break the law at small t
    assert r["claim"]["agree"]


def test_subspace_rotation_linear_angle_below_davis_kahan(tmp_path, monkeypatch):
    seen = {}

    def record(config, **kw):   # the study's own flow path, kept for the oracle below (no second integration)
        seen["out"] = out = landscape_record(config, **kw)
        return out

    landscape_record = ex.landscape_record
    monkeypatch.setattr(ex, "landscape_record", record)
    r = _run("subspace_rotation", tmp_path)
    assert abs(r["slope_small_t"] - 1) <= 0.05
    assert r["dk_violations"] == 0
    th = np.asarray(r["theta_max"])
    assert np.all(np.diff(th) > 0) and th[-1] < np.pi / 2
    # dynamics.record_path's subspace (thin SVD of the Fisher factor) matches the dense eigendecomposition
    assert r["max_angle_diff_record_path_vs_dense"] <= 1e-8
    # independent oracle: F(θ(t)) = mean_x Jᵀ(diag p − ppᵀ)J from jax.jacfwd of the logits, numpy eigh and numpy
    # principal angles (SVD of the basis product), on the same flow path
    ls, ts, path, _ = seen["out"]
    d = int(_config("subspace_rotation").d)
    np.testing.assert_array_equal(ts, r["ts"])
    jac = jax.jit(jax.jacfwd(lambda th: ls.logits_fn({"theta": th}, ls.inputs)))

    def dense_F(th):
        J = np.asarray(jac(th))                                            # (M, C, n)
        p = np.asarray(jax.nn.softmax(ls.logits_fn({"theta": th}, ls.inputs), -1))
        Lam = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
        return np.einsum("mci,mcd,mdj->ij", J, Lam, J) / J.shape[0]

    F0 = dense_F(np.asarray(ls.params["theta"]))
    w0, V0 = np.linalg.eigh(F0)
    B0 = V0[:, ::-1][:, :d]
    gap = w0[::-1][d - 1] - w0[::-1][d]
    for i in range(0, len(ts), 7):
        F = dense_F(np.asarray(path["theta"][i]))
        Bt = np.linalg.eigh(F)[1][:, ::-1][:, :d]
        sin = np.linalg.svd(Bt - B0 @ (B0.T @ Bt), compute_uv=False)
        np.testing.assert_allclose(r["angles"][i], np.sort(np.arcsin(np.clip(sin, 0, 1))), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r["angles_record_path"][i], r["angles"][i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r["davis_kahan"][i], min(2 * np.linalg.norm(F - F0, 2) / gap, 1.0), rtol=1e-8)
    assert r["claim"]["agree"]


def test_sweep_sharded_equals_single_device():
    assert jax.device_count() == 8
    config = _config("sharpness_sweep")
    config.num_t = 12
    lams = np.array([1.0, 2.0, 5.0])
    _, du8, a8, _ = ex.sweep_flows(config, None, name="s8", lam=lams)
    _, du1, a1, _ = ex.sweep_flows(config, None, name="s1", lam=lams, devices=jax.devices()[:1])
    assert du8.shape == (3, 12)
    # the same per-point programs on 8 vs 1 devices: XLA may fuse/vectorise differently per shard shape, so equal
    # up to float64 rounding (≈ 1e-15 per operation, amplified over the ~10² RK4 steps), not bit for bit
    np.testing.assert_allclose(du8, du1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a8, a1, rtol=1e-12, atol=0)


def test_float32_theory_run_warns(tmp_path, monkeypatch):
    from alignment_geom.studies import quartic_onset as q

    monkeypatch.setattr(q, "run", lambda config, workdir: {"ok": 1})
    config = _config("quartic_onset")
    config.dtype = "float32"
    with pytest.warns(RuntimeWarning, match="float64 is needed for the small-t regime"):
        studies.run(config, str(tmp_path / "f32"))


def test_nan_along_trajectory_stops_naming_step(tmp_path):
    # a strongly coupled landscape has an indefinite H: the flow blows up at large t
    config = _config("quartic_onset")
    config.gamma = 50.0
    config.t_max = 1e4
    config.num_t = 24
    wd = str(tmp_path / "nan")
    with pytest.raises(harness.NonFiniteError, match=r"non-finite du at step \d+ \(t="):
        studies.run(config, wd)
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["status"] == "nonfinite" and res["quantity"] == "du"
    k = int(res["step"].split()[0])
    assert 0 < k < 24 and len(res["du"]) == 24 and all(v is not None for v in res["du"][:k])


@pytest.mark.parametrize("name,field,value", [
    ("quartic_onset", "lam", -1.0),
    ("quartic_onset", "d", 100),
    ("quartic_onset", "ts", (0.1, 0.05, 0.2)),
    ("quartic_onset", "t_max", 1e-4),
    ("sharpness_sweep", "lams", ()),
    ("collapse_time", "gammas", ()),
    ("gd_vs_flow", "lrs", (0.1, -0.01)),
])
def test_bad_config_rejected_before_writing(tmp_path, name, field, value):
    config = _config(name)
    setattr(config, field, value)
    wd = tmp_path / "never"
    with pytest.raises(harness.ConfigError) as ei:
        studies.run(config, str(wd))
    assert ei.value.field == field and f"config.{field}=" in str(ei.value) and "\n" not in str(ei.value)
    assert not wd.exists()


def test_every_config_has_docstring_with_command_and_runtime():
    for name in studies.MAIN_JOB:
        path = os.path.join(ROOT, "configs", f"{name}.py")
        import ast

        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert f"python -m experiments.run --config=configs/{name}.py" in doc, name
        assert "2 CPU cores" in doc and ("s on" in doc or "min on" in doc), name
        for preset in ("smoke", "default", "large"):
            c = _config(name, preset)
            assert c.experiment == name and c.preset == preset
            studies.validate(c)


def test_main_job_summary_table(tmp_path, capsys):
    out = tmp_path / "figures"
    status = studies.main_job(str(out), preset="smoke", only=["drift", "coupling_sweep"])
    assert status == 0
    summary = json.load(open(out / "summary.json"))
    assert [r["figure"] for r in summary["rows"]] == ["drift", "coupling_sweep"]
    assert all(r["agree"] and "error" not in r for r in summary["rows"])
    table = capsys.readouterr().out
    assert "| figure | quantity | measured | expected | agree? |" in table and "| drift |" in table
    assert (out / "summary.md").read_text().startswith("| figure |")
    for name in ("drift", "coupling_sweep"):
        assert (out / f"{name}.png").exists() and (out / name / "results.json").exists()
        assert not (out / name / "checkpoints").exists()
