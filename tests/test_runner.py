"""alignment_geom.harness (validation, workdirs, checkpoints and resume, sharding) and the command line."""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignment_geom import harness, studies
from configs import common

# --------------------------------------------------------------------------- helpers


def _fake_experiment(monkeypatch, name, run_fn, *, theory=False, validate=None):
    mod = types.ModuleType(f"alignment_geom.studies.{name}")
    mod.run = run_fn
    mod.THEORY = theory
    if validate is not None:
        mod.validate = validate
    monkeypatch.setitem(studies.STUDIES, name, mod)
    return mod


def _cfg(**kw):
    c = ml_collections.ConfigDict()
    c.experiment = kw.pop("experiment", "fake_ok")
    c.dtype = "float64"
    c.seed = 0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# --------------------------------------------------------------------------- errors + validation


def test_config_error_is_one_line_naming_field_value_allowed():
    e = harness.ConfigError("lam", -1.0, "a finite number > 0")
    assert str(e) == "config.lam=-1.0 is not allowed: a finite number > 0"
    assert "\n" not in str(e)


@pytest.mark.parametrize("field,value,fn", [
    ("lam", -1.0, lambda c: harness.require_positive(c, "lam")),
    ("lam", 0.0, lambda c: harness.require_positive(c, "lam")),
    ("lams", (1.0, -2.0), lambda c: harness.require_positive(c, "lams")),
    ("lams", (), lambda c: harness.require_nonempty(c, "lams")),
    ("ts", (0.1, 0.3, 0.2), lambda c: harness.require_increasing(c, "ts")),
    ("ts", (0.1,), lambda c: harness.require_increasing(c, "ts")),
    ("method", "euler", lambda c: harness.require_choice(c, "method", ("dopri5", "rk4"))),
])
def test_require_helpers_reject(field, value, fn):
    c = _cfg(**{field: value})
    with pytest.raises(harness.ConfigError) as ei:
        fn(c)
    assert ei.value.field == field and f"config.{field}=" in str(ei.value)


def test_require_d_le_n():
    with pytest.raises(harness.ConfigError, match=r"config.d=9 .*d <= n"):
        harness.require_d_le_n(_cfg(n=8, d=9))
    harness.require_d_le_n(_cfg(n=8, d=8))


def test_validate_unknown_experiment_and_dtype(monkeypatch):
    with pytest.raises(harness.ConfigError, match="config.experiment='no_such_figure'"):
        studies.validate(_cfg(experiment="no_such_figure"))
    _fake_experiment(monkeypatch, "fake_ok", lambda c, w: {})
    with pytest.raises(harness.ConfigError, match="config.dtype='float16'"):
        studies.validate(_cfg(dtype="float16"))


def test_apply_config_arg_presets_fields_and_errors():
    c = _cfg(lam=1.0, n=4, lams=(1.0, 2.0), preset="default", flag=False)
    common.apply_config_arg(c, "smoke,lam=10,n=7,lams=3/4/5,flag=true", {"smoke": {"n": 2}})
    assert (c.lam, c.n, c.lams, c.preset, c.flag) == (10.0, 7, (3.0, 4.0, 5.0), "smoke", True)
    with pytest.raises(common.ConfigArgError, match="config.foo="):
        common.apply_config_arg(c, "foo=1", {})
    with pytest.raises(common.ConfigArgError, match="config.n='abc' .*integer"):
        common.apply_config_arg(c, "n=abc", {})
    with pytest.raises(common.ConfigArgError, match="preset"):
        common.apply_config_arg(c, "huge", {"smoke": {}})
    # loading a config with a bad :ARGS string gives the harness's one-line ConfigError
    with pytest.raises(harness.ConfigError, match=r"config.lam='x' is not allowed: a number"):
        harness.load_config(os.path.join(ROOT, "configs", "quartic_onset.py") + ":lam=x")


def test_cluster_env_detection():
    assert not harness.cluster_env_present({})
    assert not harness.cluster_env_present({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert harness.cluster_env_present({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert harness.cluster_env_present({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"})
    assert harness.cluster_env_present({"SLURM_NTASKS": "4"})


def test_check_finite_names_step_and_quantity():
    ts = np.array([0.1, 0.2, 0.3, 0.4])
    vals = np.array([1.0, 2.0, np.nan, np.inf])
    with pytest.raises(harness.NonFiniteError) as ei:
        harness.check_finite("du", vals, steps=ts, partial={"x": 1})
    assert ei.value.quantity == "du" and str(ei.value.step).startswith("2 (t=0.3")
    assert "non-finite du at step 2" in str(ei.value) and ei.value.partial == {"x": 1}
    assert harness.check_finite("ok", np.ones((3, 2))) is not None


def test_to_jsonable():
    out = harness.to_jsonable({"a": np.float32(1.5), "b": jnp.arange(3), "c": (1, float("nan")), "d": np.inf})
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": [1, None], "d": None}
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- run(): workdirs, NaN, warnings


def test_run_writes_files_and_refuses_different_config(tmp_path, monkeypatch):
    calls = []

    def run_fn(config, workdir):
        calls.append(workdir)
        return {"value": np.float64(config.lam) * 2}

    _fake_experiment(monkeypatch, "fake_ok", run_fn)
    wd = str(tmp_path / "wd")
    res = studies.run(_cfg(lam=1.5), wd)
    assert res["value"] == 3.0 and res["status"] == "ok"
    for f in ("config.json", "env.json", "results.json"):
        assert os.path.exists(os.path.join(wd, f)), f
    env = json.load(open(os.path.join(wd, "env.json")))
    assert env["versions"]["jax"] == jax.__version__ and env["device_count"] == jax.device_count()
    assert json.load(open(os.path.join(wd, "config.json")))["lam"] == 1.5
    # same config again: a resume, accepted
    studies.run(_cfg(lam=1.5), wd)
    # a different config: refused, nothing changed
    before = open(os.path.join(wd, "config.json")).read()
    with pytest.raises(harness.ConfigError, match=r"config.workdir=.*fields lam differ.*--overwrite"):
        studies.run(_cfg(lam=2.0), wd)
    assert open(os.path.join(wd, "config.json")).read() == before
    res = studies.run(_cfg(lam=2.0), wd, overwrite=True)
    assert res["value"] == 4.0 and json.load(open(os.path.join(wd, "config.json")))["lam"] == 2.0


def test_run_bad_input_writes_nothing(tmp_path, monkeypatch):
    def validate(config):
        harness.require_positive(config, "lam")

    _fake_experiment(monkeypatch, "fake_ok", lambda c, w: {}, validate=validate)
    wd = tmp_path / "never"
    with pytest.raises(harness.ConfigError, match="config.lam=-1.0"):
        studies.run(_cfg(lam=-1.0), str(wd))
    assert not wd.exists()
    # a non-empty directory that is not a workdir is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(harness.ConfigError, match="config.workdir="):
        studies.run(_cfg(lam=1.0), str(other))
    assert sorted(os.listdir(other)) == ["precious.txt"]


def test_run_nonfinite_keeps_partial_results(tmp_path, monkeypatch):
    def run_fn(config, workdir):
        ts = np.linspace(0.1, 1.0, 10)
        du = ts ** 4
        du[6:] = np.nan
        harness.check_finite("du", du, steps=ts, partial={"ts": ts[:6], "du": du[:6]})
        return {}

    _fake_experiment(monkeypatch, "fake_nan", run_fn)
    wd = str(tmp_path / "nan")
    with pytest.raises(harness.NonFiniteError, match="non-finite du at step 6"):
        studies.run(_cfg(experiment="fake_nan"), wd)
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["status"] == "nonfinite" and res["quantity"] == "du" and res["step"].startswith("6")
    np.testing.assert_allclose(res["du"], np.linspace(0.1, 1.0, 10)[:6] ** 4, rtol=1e-15)


def test_theory_float32_warns(tmp_path, monkeypatch):
    _fake_experiment(monkeypatch, "fake_theory", lambda c, w: {}, theory=True)
    with pytest.warns(RuntimeWarning, match="float64 is needed for the small-t regime"):
        studies.run(_cfg(experiment="fake_theory", dtype="float32"), str(tmp_path / "a"))


# --------------------------------------------------------------------------- sharding + checkpoints


def _point_fn(p):
    # a small nonlinear per-point computation with a lax loop (like an ODE step loop)
    def body(i, x):
        return x + 0.01 * jnp.sin(p["a"] * x + p["b"])
    x = jax.lax.fori_loop(0, 50, body, jnp.ones(3, p["a"].dtype) * p["b"])
    return {"x": x, "s": jnp.sum(x ** 2)}


def test_sharded_vmap_matches_single_device_and_pads():
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    grid = {"a": np.linspace(0.5, 2.0, 13), "b": np.linspace(-1.0, 1.0, 13)}
    many = harness.sharded_vmap(_point_fn, grid)
    one = harness.sharded_vmap(_point_fn, grid, devices=jax.devices()[:1])
    ref = jax.vmap(_point_fn)(jax.tree_util.tree_map(jnp.asarray, grid))
    assert many["x"].shape == (13, 3) and many["s"].shape == (13,)
    # float64 rounding only (XLA may vectorise a shard of 2 differently from 13 points): 50 fori steps ≈ 1e-14
    np.testing.assert_allclose(many["x"], one["x"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(many["s"], np.asarray(ref["s"]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no points"):
        harness.sharded_vmap(_point_fn, {"a": np.zeros(0), "b": np.zeros(0)})


def test_grid_product():
    g = harness.grid_product(lam=[1.0, 2.0], gamma=[0.1, 0.2, 0.3])
    assert g["lam"].tolist() == [1, 1, 1, 2, 2, 2] and g["gamma"].tolist() == [0.1, 0.2, 0.3] * 2


class _Killed(Exception):
    pass


def test_checkpointed_loop_resumes_to_same_state(tmp_path):
    def step(i, s):
        return {"x": s["x"] * 1.1 + i, "k": s["k"] + 1}

    init = {"x": np.ones(4), "k": np.asarray(0)}
    ref = harness.checkpointed_loop(step, init, 7, workdir=None, name="loop")
    seen = []

    def dying(i, s):
        seen.append(i)
        if i == 4:
            raise _Killed
        return step(i, s)

    wd = str(tmp_path)
    with pytest.raises(_Killed):
        harness.checkpointed_loop(dying, init, 7, workdir=wd, name="loop", every=2)
    restored_at = []
    seen.clear()
    out = harness.checkpointed_loop(lambda i, s: (seen.append(i), step(i, s))[1], init, 7, workdir=wd, name="loop",
                                   every=2, on_restore=restored_at.append)
    assert restored_at == [4] and seen == [4, 5, 6]
    np.testing.assert_array_equal(out["x"], ref["x"])
    assert int(out["k"]) == 7


def test_checkpointed_map_resumes(tmp_path, monkeypatch):
    grid = {"a": np.linspace(0.5, 2.0, 21), "b": np.linspace(-1.0, 1.0, 21)}
    ref = harness.checkpointed_map(_point_fn, grid, workdir=None, name="m", chunk_size=8)
    real = harness.sharded_vmap
    count = {"n": 0}

    def flaky(fn, g, devices=None):
        count["n"] += 1
        if count["n"] == 3:
            raise _Killed
        return real(fn, g, devices=devices)

    monkeypatch.setattr(harness.checkpoint, "sharded_vmap", flaky)
    with pytest.raises(_Killed):
        harness.checkpointed_map(_point_fn, grid, workdir=str(tmp_path), name="m", chunk_size=8)
    count["n"] = -100
    out = harness.checkpointed_map(_point_fn, grid, workdir=str(tmp_path), name="m", chunk_size=8)
    assert count["n"] == -99, "only the unfinished chunk is recomputed"
    np.testing.assert_array_equal(out["x"], ref["x"])
    np.testing.assert_array_equal(out["s"], ref["s"])


# --------------------------------------------------------------------------- the command line


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["ALIGNMENT_GEOM_NO_PROGRESS"] = "1"
    env["ALIGNMENT_GEOM_JAX_CACHE"] = "off"     # never write to the user's persistent compile cache
    return env


def _cli(*args, module="experiments.run", timeout=300):
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/quartic_onset.py", "--config.foo=1"], "config.foo: unknown config field"),
    (["--config=configs/quartic_onset.py", "--config.lam=abc"], "config.lam=abc"),
    (["--config=configs/quartic_onset.py:lam=-2"], "config.lam=-2.0 is not allowed: a finite number > 0"),
    (["--config=configs/quartic_onset.py", "--config.d=100"], "config.d=100 is not allowed"),
    (["--config=configs/sharpness_sweep.py", "--config.lams=()"], "config.lams=() is not allowed: a non-empty sweep"),
    (["--config=configs/quartic_onset.py", "--config.ts=(0.1,0.05)"], "config.ts=(0.1, 0.05) is not allowed"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args, needle):
    wd = tmp_path / "wd"
    p = _cli(*args, f"--workdir={wd}")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert not wd.exists()


def test_cli_refuses_workdir_with_other_config(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"experiment": "quartic_onset", "lam": 1.0}))
    p = _cli("--config=configs/quartic_onset.py:smoke", f"--workdir={wd}")
    assert p.returncode == 2 and "config.workdir=" in p.stderr and "--overwrite" in p.stderr
    assert sorted(os.listdir(wd)) == ["config.json"]


def test_sigkill_then_rerun_resumes_to_identical_results(tmp_path):
    """A checkpointed sweep killed (SIGKILL) right after its first chunk is saved (the deterministic crash hook),
    then the same command again: its results.json equals that of an uninterrupted run of the same command."""
    import signal
    import subprocess

    overrides = ["--config.lams=(1.0,2.0,4.0,8.0,16.0,32.0)", "--config.gammas=(0.15,0.3,0.45,0.6)",
                 "--config.chunk_size=8"]
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.run", "--config=configs/collapse_time.py:smoke", *overrides,
           f"--workdir={wd}"]
    env = _env()
    env["ALIGNMENT_GEOM_JAX_CACHE"] = str(tmp_path / "jax_cache")   # the reruns reuse the compiled programs
    p = subprocess.run(cmd, cwd=ROOT, env={**env, harness.CRASH_ENV: "collapse_time:1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ckdir = wd / "checkpoints" / "collapse_time"
    assert not (wd / "results.json").exists()
    assert sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) == [1]   # 24 points / 8 per chunk = 3 chunks
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    resumed = json.load(open(wd / "results.json"))
    assert json.load(open(wd / "timing.json"))["resumed"] is True
    # the uninterrupted run: same command, fresh workdir
    straight_wd = tmp_path / "straight"
    p = subprocess.run(cmd[:-1] + [f"--workdir={straight_wd}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.load(open(straight_wd / "timing.json"))["resumed"] is False
    straight = json.load(open(straight_wd / "results.json"))
    assert resumed == straight and resumed["claim"]["agree"]


def test_default_xla_flags_added_unless_set(monkeypatch):
    from alignment_geom import harness

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert harness.default_xla_flags() == ("--xla_force_host_platform_device_count=8 "
                                           "--xla_cpu_use_fusion_emitters=false")
    # a value the user set is kept, not overridden or repeated
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert harness.default_xla_flags() == "--xla_cpu_use_fusion_emitters=true"
    monkeypatch.delenv("XLA_FLAGS")
    assert harness.default_xla_flags(("--a=1", "--b=2")) == "--a=1 --b=2"
